"""--memory-limit's accounting holds in a fresh process: what loads after the budget is split (the tokenizer)
or on the first decode step (the kernels' runtime, ~60 MiB) must already be in it. A fresh process, because
in this one earlier tests have loaded those already."""

import json
import subprocess
import sys

# the peak is VmHWM, this process's own: ru_maxrss would carry the RSS of the (large) pytest process it was
# forked from across the exec
SCRIPT = """
import json, sys
import moepager
e = moepager.load(sys.argv[1], memory_limit=sys.argv[2], max_context=256, prefetch=False)
for _ in e.stream([1, 2, 3, 4], 6, temperature=1.0, seed=0):
    pass
c = e.experts.cache
status = open("/proc/self/status").read().split("VmHWM:")[1]
hwm = int(status.split()[0]) * 1024
print(json.dumps({"planned": c.footprint["total"], "experts": c.stats()["allocated_bytes"],
                  "peak": hwm}))
"""


def test_peak_stays_within_what_the_limit_planned(tiny):
    path, _ = tiny("mixtral")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), "1GiB"], capture_output=True, text=True,
                         timeout=300, check=True)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak"] <= r["planned"] + r["experts"], r
