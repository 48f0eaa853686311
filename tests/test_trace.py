"""Routing traces: recording, the file format, offline replay of every policy, and Belady's bound."""

import importlib.util
import json
import random
from functools import cache
from pathlib import Path

import pytest

from moepager.cli import main
from moepager.errors import MoepagerError
from moepager.paging.policies import POLICIES
from moepager.paging.trace import Trace, belady, capacity_for, compare, load_trace, replay, zipf_trace


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


def test_belady_holds_a_step_together():
    # capacity 2: the second step needs experts 1 and 2 at once, so expert 0 of layer 0 must go. MIN on the
    # flattened sequence (0, 1, 2, 0) would drop 1 after using it to load 2 and count a hit on 0's return.
    req = [(0, [0]), (1, [1, 2]), (0, [0])]
    assert belady(req, 2) == 0.0
    assert belady(req, 3) == pytest.approx(1 / 4)


def _optimum(requests, capacity):
    """The most hits any choice of victims gets under replay's rules, by exhaustive search: a step's resident
    experts hit and are held, its misses take free slots or evict an unheld key in order, and what does not
    fit waits for the next wave."""

    @cache
    def step(i, resident):
        if i == len(requests):
            return 0
        layer, experts = requests[i]
        held = tuple(e for e in experts if (layer, e) in resident)
        return len(held) + load(i, resident, experts, held)

    def load(i, resident, pending, held):
        layer = requests[i][0]
        todo = [e for e in pending if e not in held and (layer, e) not in resident]
        if not todo:
            return finish(i, resident, pending, held)
        key = (layer, todo[0])
        if len(resident) < capacity:
            return load(i, resident | {key}, pending, held + (todo[0],))
        victims = [k for k in resident if k[0] != layer or k[1] not in held]
        if not victims:
            return finish(i, resident, pending, held)
        return max(load(i, (resident - {v}) | {key}, pending, held + (todo[0],)) for v in victims)

    def finish(i, resident, pending, held):
        rest = tuple(e for e in pending if e not in held)
        return load(i, resident, rest, ()) if rest else step(i + 1, resident)

    return step(0, frozenset()) / sum(len(e) for _, e in requests)


@pytest.mark.parametrize("seed", range(40))
def test_belady_is_the_optimum_of_the_replay(seed):
    rng = random.Random(seed)
    t = Trace(2, 4, 2)
    for _ in range(rng.randint(2, 4)):
        for layer in range(2):  # one token, or two (a prefill) whose union may not fit
            tokens = rng.choice([1, 1, 2])
            t.steps.append((layer, [rng.sample(range(4), rng.randint(1, 3)) for _ in range(tokens)]))
    req = t.requests()
    widest = max(len(e) for _, e in req)
    for cap in (2, 3, 4):
        best = _optimum(req, cap)
        if cap >= widest:
            assert belady(req, cap) == pytest.approx(best), cap  # exact when every step fits
        else:
            assert belady(req, cap) >= best - 1e-12, cap  # waves: still a bound


def test_per_token_and_top_k_traces():
    # a forward of two tokens through two layers, then one decode token
    steps = [(0, [[0, 1, 2], [3, 2, 1]]), (1, [[1, 2, 3], [0, 1, 2]]), (0, [[2, 0, 1]]), (1, [[3, 0, 1]])]
    t = Trace(2, 4, 3, steps)
    d = t.per_token()
    tokens = [[0, 1, 2], [1, 2, 3], [3, 2, 1], [0, 1, 2], [2, 0, 1], [3, 0, 1]]
    assert d.steps == [(layer, [ids]) for layer, ids in zip([0, 1] * 3, tokens)]
    assert d.per_token().steps == d.steps
    top1 = d.top(1)
    assert top1.top_k == 1 and [ids for _, ids in top1.steps] == [[[0]], [[1]], [[3]], [[0]], [[2]], [[3]]]
    with pytest.raises(MoepagerError, match="top_k"):
        t.top(4)


def test_nextuse_beats_lru_and_lfu_on_a_skewed_trace():
    t = zipf_trace(num_layers=8, num_experts=32, top_k=4, tokens=200, seed=3)
    rates = compare(t, capacity_for("25%", t))
    assert rates["nextuse"] > max(rates["lru"], rates["lfu"])
    assert rates["belady"] >= rates["nextuse"]


def test_nextuse_against_belady_on_the_zipf_trace():
    # measured: 0.808, 0.880 and 0.929 of Belady at 10%, 25% and 50% (benchmarks/README.md, policies)
    t = zipf_trace()
    for budget, share in (("10%", 0.8), ("25%", 0.87), ("50%", 0.92)):
        rates = compare(t, capacity_for(budget, t), {"nextuse": POLICIES["nextuse"]})
        assert rates["nextuse"] >= share * rates["belady"], budget


def test_nextuse_on_recorded_routing():
    # the default model's real routing over 300 tokens of text, as decode asks for it, cut to top-4. On the
    # 16-expert top-12 recording: lru 0.433, lfu 0.435, nextuse 0.459, Belady 0.650 at 25% (0.71 of the bound)
    real = load_trace(Path(__file__).parents[1] / "benchmarks/traces/default_gpl3.json").per_token().top(4)
    t = Trace(real.num_layers, real.num_experts, real.top_k, real.steps[: 300 * real.num_layers])
    rates = compare(t, capacity_for("25%", t))
    assert rates["nextuse"] > max(rates["lru"], rates["lfu"])
    assert rates["nextuse"] >= 0.68 * rates["belady"]


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
    # the 4-token prompt becomes 4 single-token passes: same experts asked for, one token at a time
    assert main(["replay", str(trace), "--budget", "50%", "--per-token", "--top-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hit_rate"]["50%"]["belady"] > 0
    assert main(["replay", str(trace), "--top-k", "99"]) == 2
    assert main(["stats", str(record)]) == 0
    table = capsys.readouterr().out
    assert "layer 0" in table and "total" in table and "hit_rate" in table
    assert main(["run", str(path), "--prompt-ids", "1", "--pin", "0-1"]) == 2
    assert "LAYER:EXPERT" in capsys.readouterr().err


def test_replay_plot_is_checked_before_the_replay(tmp_path, monkeypatch, capsys):
    """Without matplotlib, or into a missing folder, --plot is refused before the trace is even read
    (the trace here does not exist: reading it would be a different error)."""
    missing = str(tmp_path / "no-trace.json")
    assert main(["replay", missing, "--plot", str(tmp_path / "no" / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot" in err and "does not exist; create it" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    assert main(["replay", missing, "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plotting needs matplotlib" in err and not (tmp_path / "p.png").exists()
