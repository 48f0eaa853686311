"""The server-side cost of the live view: seconds of one event (LiveFeed.snapshot on the default model, experts
paged at 25%, after 32 decoded tokens), and that times LIVE_HZ as a share of one core.

    python benchmarks/live_snapshot_cost.py
"""

import time

import moepager
from moepager.generation.batching import Scheduler
from moepager.serving.live import LIVE_HZ, LiveFeed

engine = moepager.load(expert_memory="25%")
engine.generate([1, 2, 3, 4], max_new_tokens=32, temperature=1.0, seed=0)
feed = LiveFeed(engine, Scheduler(engine), "default")
feed.snapshot()
n, t0 = 200, time.perf_counter()
for _ in range(n):
    feed.snapshot()
per_event = (time.perf_counter() - t0) / n
decode_s = engine.stats()["decode_s"] / engine.stats()["decode_tokens"]
print(
    f"one event: {per_event * 1e3:.2f} ms; at {LIVE_HZ} Hz {per_event * LIVE_HZ:.2%} of one core "
    f"(a decode step here: {decode_s * 1e3:.0f} ms)"
)
