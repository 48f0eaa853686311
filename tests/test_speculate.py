"""Speculative decoding: greedy tokens identical to decoding without drafts (every draft kind, several
families, experts resident and paged, KV cache in RAM and spilled), the KV cache rolled back exactly, and
sampling checked against the model's own distribution (computed exactly from full forwards)."""

import math

import pytest
import torch
from tiny_models import VOCAB

import moepager
from moepager.generation.generate import SamplingParams
from moepager.generation.speculate import Draft, _rejection

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]  # GQA, head norm + dense layer, MLA, windows
SETUPS = {
    "resident": {},
    "paged": {"expert_memory": "50%"},
    "paged_spilled_kv": {"expert_memory": "50%", "kv_memory": 1, "kv_block_size": 4},
}


def _prompts(n=3):
    out = []
    for seed in range(n):
        ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
        out.append(ids + ids[:8])  # a repeat gives prompt lookup something to find
    return out


@pytest.fixture(scope="module")
def plain(tiny):
    made = {}

    def get(family):
        if family not in made:
            engine = moepager.load(tiny(family)[0])
            made[family] = [engine.generate(p, 32, stop_ids=[]) for p in _prompts()]
        return made[family]

    return get


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("draft", ["ngram", "self"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical(tiny, plain, family, draft, setup):
    engine = moepager.load(tiny(family)[0], speculate=draft, draft_tokens=3, **SETUPS[setup])
    got = [engine.generate(p, 32, stop_ids=[]) for p in _prompts()]
    assert got == plain(family)
    s = engine.stats()["speculation"]
    assert s["drafted"] > 0 and s["accepted"] > 0
    assert s["produced"] == sum(len(g) - 1 for g in got)  # every token after the prefill's came from a round
    if setup == "paged_spilled_kv":
        assert engine.kv_stats["blocks_spilled"] > 0
    if setup != "resident":
        assert s["expert_reads"] > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_draft_model_greedy_identical(tiny, plain, family):
    engine = moepager.load(tiny(family)[0], speculate=str(tiny("olmoe")[0]), expert_memory="50%")
    assert [engine.generate(p, 32, stop_ids=[]) for p in _prompts()] == plain(family)
    assert engine.stats()["speculation"]["drafted"] > 0


def test_draft_model_of_another_vocabulary_is_refused(tiny, tmp_path):
    from tiny_models import build

    build("olmoe", tmp_path / "wide", vocab_size=VOCAB * 2)
    with pytest.raises(moepager.MoepagerError, match="vocabulary"):
        moepager.load(tiny("mixtral")[0], speculate=str(tmp_path / "wide"))


@pytest.mark.parametrize("kv", [{}, {"kv_memory": 1, "kv_block_size": 4}])
def test_cache_holds_what_was_yielded_and_continues(tiny, kv):
    """A stop id inside a verified round: the cache keeps exactly the positions decoding without drafts
    keeps, and a later turn on the same cache gives the same tokens."""
    path = tiny("mixtral")[0]
    plain_engine, spec = moepager.load(path, **kv), moepager.load(path, speculate="ngram", **kv)
    prompt = _prompts(1)[0]
    expected = plain_engine.generate(prompt, 40, stop_ids=[])
    stop = expected[len(expected) // 2]
    outs = []
    for engine in (plain_engine, spec):
        cache = engine.new_cache()
        first = engine.generate(prompt, 40, stop_ids=[stop], cache=cache)
        assert cache.seq_len == len(prompt) + len(first) - 1
        second = engine.generate([first[-1], 7, 8, 9], 20, stop_ids=[], cache=cache)
        outs.append((first, second))
    assert outs[0] == outs[1]
    s = spec.stats()["speculation"]
    assert 0 < s["accepted"] < s["drafted"]  # drafts were rejected: the cache was rolled back past them


# ---------------------------------------------------------------------------------------- sampling


def _chi_square_ok(counts: dict, probs: dict, n: int) -> bool:
    """Pearson's test at p = 1e-4 (cells expecting fewer than 5 pooled): fixed seeds make it deterministic,
    and so strict a level keeps a correct sampler passing while a wrong one (tested below) fails."""
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, -1
    for key, p in probs.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
            continue
        stat, df = stat + (o - e) ** 2 / e, df + 1
    unexpected = sum(o for key, o in counts.items() if key not in probs)
    pooled_obs += unexpected
    if pooled_exp > 0:
        stat, df = stat + (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9), df + 1
    elif pooled_obs:
        return False
    z = 3.719  # the normal quantile of 1 - 1e-4; Wilson-Hilferty gives the chi-square one
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat <= limit


def test_rejection_sampling_follows_the_target():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.2, 0.3, 0.2, 0.2]])  # [2, V]
    q = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1]])
    n = 20000
    for case in ("sampled", 0, 4):  # a draft drawn from q; one-hot drafts (a likely token, an impossible one)
        firsts, wrong = {}, {}
        for _ in range(n):
            if case == "sampled":  # speculative sampling's premise: the draft is a sample of q
                draft = Draft([int(torch.multinomial(q[0], 1, generator=g))], q)
            else:
                draft = Draft([case])
            tid = _rejection(p, draft, g)[0]
            firsts[tid] = firsts.get(tid, 0) + 1
            wrong[draft.tokens[0]] = wrong.get(draft.tokens[0], 0) + 1  # a sampler that keeps every draft
        target = {i: float(x) for i, x in enumerate(p[0]) if x > 0}
        assert _chi_square_ok(firsts, target, n)
        assert not _chi_square_ok(wrong, target, n)  # the test has the power to see a wrong sampler


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_sampled_tokens_follow_the_model(tiny, draft):
    """The first three tokens over many seeds against their exact joint distribution from full forwards."""
    path = tiny("mixtral")[0]
    budget = "75%"  # room for a few experts beyond each layer's top-k, so self drafts route among some
    engine = moepager.load(path, speculate=draft, draft_tokens=2, expert_memory=budget)
    params = SamplingParams(temperature=1.0, top_k=3)
    reference = moepager.load(path)
    base = [9, 40, 77, 3, 12]
    said = reference.generate(base, 12, stop_ids=[])
    prompt = base + said + base + said[:2]  # a repeat, so prompt lookup drafts tokens the model may pick
    from moepager.generation.generate import probabilities

    def dist(prefix):
        return probabilities(reference.logits(prompt + prefix)[0, -1:], params)[0]

    exact = {}
    p1 = dist([])
    for a in torch.nonzero(p1).flatten().tolist():
        p2 = dist([a])
        for b in torch.nonzero(p2).flatten().tolist():
            p3 = dist([a, b])
            for c in torch.nonzero(p3).flatten().tolist():
                exact[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    n, counts = 1500, {}
    for seed in range(n):
        key = tuple(engine.generate(prompt, 3, temperature=1.0, top_k=3, seed=seed, stop_ids=[]))
        counts[key] = counts.get(key, 0) + 1
    s = engine.stats()["speculation"]
    assert 0 < s["accepted"] < s["drafted"]  # both the kept and the resampled paths ran
    assert _chi_square_ok(counts, exact, n)
    # seeded runs repeat (self drafts depend on what is resident: compare engines in the same state)
    runs = [moepager.load(path, speculate=draft, draft_tokens=2, expert_memory=budget) for _ in range(2)]
    assert len({tuple(e.generate(prompt, 12, temperature=1.0, seed=3, stop_ids=[])) for e in runs}) == 1


def test_server_scheduler_speculates_a_lone_sequence(tiny, plain):
    import threading

    from moepager.generation.batching import Scheduler, Sequence
    from moepager.runtime.summary import summary_line
    from moepager.serving.metrics import Metrics

    engine = moepager.load(tiny("mixtral")[0], speculate="ngram", expert_memory="50%")
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        tokens, done = [], threading.Event()

        def on_event(event):
            if event[0] == "token":
                tokens.append(event[1])
            else:
                done.set()

        scheduler.submit(Sequence(_prompts(1)[0], 32, SamplingParams(), on_event))
        assert done.wait(60)
    finally:
        scheduler.stop()
    assert tokens == plain("mixtral")[0]
    assert engine.stats()["speculation"]["rounds"] > 0
    text = Metrics(scheduler, engine).render().decode()
    assert (
        "moepager_speculative_accepted_tokens_total" in text
        and "moepager_speculative_acceptance_ratio" in text
    )
    assert "ngram drafts:" in summary_line(engine.stats())


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_gguf_blocks_greedy_identical(draft):
    """A GGUF computed from its blocks (compact embedding and matrices: no float weights to take a device
    from), paged: drafts change nothing."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "gguf" / "qwen3_moe.q4_0.gguf"
    plain = moepager.load(path)
    spec = moepager.load(path, expert_memory="50%", speculate=draft, draft_tokens=3)
    for prompt in _prompts(2):
        assert spec.generate(prompt, 24, stop_ids=[]) == plain.generate(prompt, 24, stop_ids=[])
