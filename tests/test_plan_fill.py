"""The parts of `moepager plan`'s prediction: the cold-start fill model, the sampled routing it measures, and
the time to first token. Counts and identities, not timing."""

import random

import pytest

import moepager
from moepager.paging.fill import RoutingSample, expected_distinct, fit_alpha, forecast
from moepager.paging.policies import make_policy
from moepager.runtime.plan import DEFAULT_PROMPT, format_plan, plan, trace_start


def _steps(prompt_tokens: int, decode_tokens: int, layers=(0, 1), experts=16, k=4, seed=0, used=None):
    """A trace's steps: one prefill pass of prompt_tokens tokens, then one pass per decoded token, each token
    picking k of the first `used` experts (default: all)."""
    rng = random.Random(seed)
    pick = lambda: rng.sample(range(used or experts), k)  # noqa: E731
    steps = [(layer, [pick() for _ in range(prompt_tokens)]) for layer in layers]
    for _ in range(decode_tokens):
        steps += [(layer, [pick()]) for layer in layers]
    return steps


def test_fit_alpha_recovers_the_urn_that_shows_as_many_experts():
    for alpha in (0.05, 1.0, 30.0):
        distinct = expected_distinct(alpha, 200, 64)
        assert fit_alpha(200, distinct, 64) == pytest.approx(alpha, rel=1e-3)
    assert expected_distinct(1e6, 200, 64) == pytest.approx(64 * (1 - (63 / 64) ** 200), rel=1e-3)  # uniform
    assert fit_alpha(200, 64.0, 64) == 1e6  # every expert seen: as spread as routing gets


def test_routing_sample_splits_prefill_and_decode():
    steps = _steps(prompt_tokens=5, decode_tokens=3)
    s = RoutingSample.from_steps(steps, experts=16, top_k=4)
    assert [layer for layer, _ in s.prompt] == [0, 1] and len(s.decode) == 3
    assert all([layer for layer, _ in d] == [0, 1] for d in s.decode)
    assert sum(s.counts[0]) == (5 + 3) * 4
    assert s.prompt[0][1] == sorted({e for token in steps[0][1] for e in token})


def test_fill_model_with_room_for_every_expert_misses_each_once():
    """Reference: with slots for every expert, a step misses exactly the experts no earlier step used."""
    steps = _steps(prompt_tokens=4, decode_tokens=20)
    s = RoutingSample.from_steps(steps, experts=16, top_k=4)
    fc = forecast(s, capacity=32, tokens=20, policy=make_policy(None))
    seen: set = set()
    expected = []
    for i, (layer, ids) in enumerate(steps):
        new = {(layer, e) for token in ids for e in token} - seen
        seen |= new
        if i >= 2:  # after the prefill's two layer steps, two per decoded token
            expected.append(len(new)) if layer == 0 else expected.__setitem__(-1, expected[-1] + len(new))
        else:
            expected_prompt = len(seen)
    assert fc.prompt_misses == expected_prompt and fc.misses == expected
    assert fc.steady_misses == 0.0 and fc.steady_hit_rate == 1.0  # everything read once stays


def test_fill_model_runs_past_the_trace_from_cold_to_warm():
    """Routing concentrated on 12 of 64 experts per layer: the urns keep to them, mostly, so a cache of 40
    slots fills over the first tokens and then misses rarely; 8 slots keep missing."""
    steps = _steps(prompt_tokens=2, decode_tokens=6, experts=64, used=12)
    s = RoutingSample.from_steps(steps, experts=64, top_k=4)
    assert s.alpha() < 10  # concentrated: far from uniform (1e6)
    fc = forecast(s, capacity=40, tokens=60, policy=make_policy(None), seed=1)
    assert len(fc.misses) == 60 and fc.misses[:6] == forecast(s, 40, 6, make_policy(None)).misses
    assert all(0 <= m <= 8 for m in fc.misses)  # 4 experts in each of 2 layers
    assert sum(fc.misses[:5]) > 2 * sum(fc.misses[-5:]) and 0.5 < fc.steady_hit_rate < 1
    again = forecast(s, capacity=40, tokens=60, policy=make_policy(None), seed=1)
    assert again == fc  # seeded: the same forecast every time
    assert forecast(s, capacity=8, tokens=60, policy=make_policy(None)).steady_hit_rate < fc.steady_hit_rate


def _resident_trace(path, prompt, tokens, **sampling):
    engine = moepager.load(str(path), record_trace=True)
    out = engine.generate(prompt, tokens, stop_ids=None, **sampling)
    return out, engine.trace.steps


def test_plan_measures_the_routing_of_sampled_decoding(tiny):
    """The traced tokens are the run's own: the same routing as generating them with every expert resident
    (an engine without paging), at the temperature and seed asked for; greedy routes otherwise."""
    path = tiny("qwen3_moe")[0]
    engine = moepager.load(str(path), expert_memory="40%", prefetch=False, record_trace=True)
    trace_start(engine, DEFAULT_PROMPT, 9, temperature=1.0, seed=3, seconds=60)
    _, sampled = _resident_trace(path, DEFAULT_PROMPT, 9, temperature=1.0, seed=3)
    _, greedy = _resident_trace(path, DEFAULT_PROMPT, 9)
    assert engine.trace.steps == sampled and sampled != greedy


def test_plan_time_to_first_token_is_prefill_compute_and_its_reads(tiny):
    """TTFT = the prefill's compute + its wait on reads; the reads are the prompt's distinct experts (every one
    fits the limit's cache), counted here from a resident engine's routing of the same prompt."""
    path = tiny("qwen3_moe")[0]
    import psutil

    p = plan(str(path), psutil.Process().memory_info().rss + 256 * 2**20, max_context=128, max_tokens=12,
             temperature=1.0, seed=0, trace_tokens=4)  # fmt: skip
    _, steps = _resident_trace(path, DEFAULT_PROMPT, 1)
    prompt_keys = {(layer, e) for layer, ids in steps for token in ids for e in token}
    assert p.prefill_misses == len(prompt_keys)
    assert p.ttft_s == pytest.approx(p.prefill_compute_s + p.prefill_read_s)
    assert p.traced_tokens == 4 and p.run_tokens == 12 and p.prompt_tokens == len(DEFAULT_PROMPT)
    text = format_plan(p)
    assert "sampled at temperature 1, seed 0" in text and "time to first token:" in text
    assert "--max-tokens 12 --temperature 1 --seed 0 --prompt-ids 1,2," in text
    assert "steady state (cache warm)" in text and "over a run of 12 tokens" in text


def test_plan_json_gives_the_run_it_predicted(tiny, capsys):
    """`plan --json` names the exact run; that run generates the planned number of tokens in the same cache."""
    import json
    import shlex

    import psutil

    from moepager.cli import main

    path = str(tiny("qwen3_moe")[0])
    limit = str(psutil.Process().memory_info().rss + 256 * 2**20)
    argv = ["plan", path, "--memory", limit, "--max-context", "128", "--max-tokens", "8", "--temperature", "1",
            "--seed", "2", "--trace-tokens", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["traced_tokens"] == 3 and p["run_tokens"] == 8 and p["temperature"] == 1.0 and p["seed"] == 2
    command = shlex.split(p["run_command"])
    assert command[:3] == ["moepager", "run", path] and "--no-prefetch" in command and "--no-fill" in command
    assert main([*command[1:], "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == 8 and record["stats"]["experts"]["capacity"] == p["cache_experts"]
