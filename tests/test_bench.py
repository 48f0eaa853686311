"""The benchmark harness end to end on a tiny model: one budget, no peers, no cgroup, no root needed.

Nothing here asserts a speed: only that every run happened and that the records, the table and the
summary hold what the report promises.
"""

import json

import pytest

from moepager.bench import BenchOptions, budget_bytes, main
from moepager.bench.limits import disk_bandwidth
from moepager.bench.report import markdown, summarize
from moepager.errors import MoepagerError


def test_bench_smoke_on_tiny_model(tiny, tmp_path):
    path, _ = tiny("mixtral")
    opts = BenchOptions(model=str(path), budgets=["50%"], rounds=1, tokens=3, prompt_tokens=4, peers=[],
                        use_cgroup=False, drop_caches=False, work_dir=str(tmp_path / "work"),
                        out=str(tmp_path / "results"), name="tiny", command="test")  # fmt: skip
    record = main(opts)
    runs = {r["engine"]: r for r in record["runs"]}
    assert runs["resident"]["status"] == "ok", runs["resident"]
    assert runs["resident"]["decode_tokens"] == 2 and len(runs["resident"]["token_ids"]) == 3
    assert runs["resident"]["memory"]["method"].startswith("rss+fincore")
    mp = runs["moepager"]
    if mp["status"] == "skipped":  # a build without the expert cache still benchmarks what it has
        assert "paging" in mp["message"]
    else:
        assert mp["status"] == "ok", mp
        assert mp["token_ids"] == runs["resident"]["token_ids"]  # paging is exact
        assert 0 <= mp["expert"]["hit_rate"] <= 1 and mp["expert"]["bytes_read_per_token"] >= 0
        assert "50%" in record["summary"]["limits"]
    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert saved["runs"] and saved["machine"]["torch"] and saved["bandwidth"]
    assert "| budget |" in (tmp_path / "results" / "tiny.md").read_text()


def test_summary_limit_and_ratios():
    run = lambda engine, rate, read=None, rnd=0: {  # noqa: E731
        "engine": engine, "budget": "25%", "round": rnd, "status": "ok", "decode_tokens_per_s": rate,
        "expert": {"bytes_read_per_token": read, "hit_rate": 0.5, "wait_fraction": 0.1} if read else None,
        "memory": {"peak_bytes": 1 << 30, "failcnt": 0},
    }  # fmt: skip
    runs = [run("resident", 10.0), run("moepager", 2.0, 1e9), run("moepager", 4.0, 1e9, 1), run("accelerate", 0.1),
            {"engine": "llamacpp", "budget": "25%", "round": 0, "status": "skipped", "message": "not installed"}]
    s = summarize(runs, bandwidth=[2e9, 2e9])
    lim = s["limits"]["25%"]
    assert lim["bound"] == "disk" and lim["floor_s_per_token"] == pytest.approx(0.5)
    assert lim["efficiency"] == pytest.approx(0.5 / (1 / 3.0))  # median of 2 and 4 tok/s
    assert s["ratios"]["25%"]["moepager_over_accelerate"] == pytest.approx(30.0)
    record = {"workload": "w", "command": "c", "model": {"description": "d"}, "machine_line": "m",
              "options": {"rounds": 2, "prompt_tokens": 4, "tokens": 3}, "summary": s}  # fmt: skip
    table = markdown(record)
    assert "not installed" in table and "30.00x" in table


def test_budget_parsing_and_bandwidth(tmp_path):
    assert budget_bytes("25%", 1000) == 250 and budget_bytes("1MiB", 10) == 1 << 20
    with pytest.raises(MoepagerError):
        budget_bytes("150%", 1000)
    f = tmp_path / "blob"
    f.write_bytes(b"\1" * (1 << 20))
    bw = disk_bandwidth([f], total_bytes=1 << 20, request=256 << 10, threads=2)
    assert bw["bytes"] > 0 and bw["bytes_per_s"] > 0
