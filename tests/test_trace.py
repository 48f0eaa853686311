"""Routing traces: recording, the file format, offline replay of every policy, and Belady's bound."""

import json
import random

import pytest

from moepager.cli import main
from moepager.errors import MoepagerError
from moepager.policies import POLICIES
from moepager.trace import Trace, belady, capacity_for, compare, load_trace, replay, zipf_trace


def _random_trace(seed, layers=3, experts=8, k=2, tokens=60, prefill=5):
    rng = random.Random(seed)
    t = Trace(layers, experts, k)
    for layer in range(layers):  # a prefill step routes several tokens at once
        t.steps.append((layer, [rng.sample(range(experts), k) for _ in range(prefill)]))
    for _ in range(tokens):
        for layer in range(layers):
            t.steps.append((layer, [rng.sample(range(experts), k)]))
    return t


@pytest.mark.parametrize("seed", range(6))
def test_belady_bounds_every_policy(seed):
    t = _random_trace(seed)
    req = t.requests()
    for cap in (2, 3, 5, 8, 12, 24):
        bound = belady(req, cap)
        for name, make in POLICIES.items():
            assert replay(req, cap, make()) <= bound + 1e-12, (name, cap)
    assert belady(req, t.num_keys()) == replay(req, t.num_keys(), POLICIES["lru"]())  # only cold misses


def test_belady_known_answer():
    # one layer, capacity 2, requests a b c a b: at c, MIN evicts b (needed after a), so only a hits
    req = [(0, [e]) for e in (0, 1, 2, 0, 1)]
    assert belady(req, 2) == pytest.approx(1 / 5)
    assert replay(req, 2, POLICIES["lru"]()) == 0.0


def test_nextuse_beats_lru_and_lfu_on_a_skewed_trace():
    t = zipf_trace(num_layers=8, num_experts=32, top_k=4, tokens=200, seed=3)
    rates = compare(t, capacity_for("25%", t))
    assert rates["nextuse"] > max(rates["lru"], rates["lfu"])
    assert rates["belady"] >= rates["nextuse"]


def test_trace_file_round_trip(tmp_path):
    t = _random_trace(0)
    t.save(tmp_path / "t.json")
    again = load_trace(tmp_path / "t.json")
    assert again.steps == t.steps and (again.num_experts, again.top_k) == (8, 2)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MoepagerError, match="not a routing trace"):
        load_trace(tmp_path / "bad.json")
    with pytest.raises(MoepagerError, match="does not exist"):
        load_trace(tmp_path / "missing.json")
    with pytest.raises(MoepagerError, match="--budget"):
        capacity_for("lots", t)


def test_run_trace_replay_and_stats_commands(tiny, tmp_path, capsys):
    path, _ = tiny("qwen3_moe")
    trace, record = tmp_path / "trace.json", tmp_path / "run.json"
    args = ["run", str(path), "--prompt-ids", "1,2,3,4", "--max-tokens", "6", "--expert-memory", "40%",
            "--policy", "lru", "--pin", "0:1", "--trace", str(trace), "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["experts"]["pinned"] == 1 and out["stats"]["experts"]["policy"] == "lru"
    record.write_text(json.dumps(out))
    t = load_trace(trace)
    assert len(t.steps) == 6 * 2  # six forward passes, two MoE layers
    assert main(["replay", str(trace), "--budget", "25%,50%", "--json"]) == 0
    rates = json.loads(capsys.readouterr().out)["hit_rate"]
    assert set(rates["25%"]) == {"lru", "lfu", "nextuse", "belady"}
    assert main(["stats", str(record)]) == 0
    table = capsys.readouterr().out
    assert "layer 0" in table and "total" in table and "hit_rate" in table
    assert main(["run", str(path), "--prompt-ids", "1", "--pin", "0-1"]) == 2
    assert "LAYER:EXPERT" in capsys.readouterr().err
