"""Paged experts against transformers: exact output at every expert budget, with and without prefetch, for every
family and from every kind of source (checkpoint, store, GGUF)."""

import warnings

import pytest
import torch
from tiny_models import FAMILIES, VOCAB

import moepager
from moepager.errors import MoepagerError
from moepager.model.decoder import Transformer

PAGED = FAMILIES


def _load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the minimum-budget warning is tested on its own
        return moepager.load(path, **kw)


def _budgets(engine):
    """From one expert (raised to the minimum working set) up to every expert resident."""
    s = engine.stats()["experts"]
    n = s["total_expert_bytes"] // s["slot_bytes"]
    return [1] + [k * s["slot_bytes"] for k in sorted({engine.config.top_k + 1, n // 2, n})]


@pytest.fixture(scope="module")
def references(tiny):
    made = {}

    def get(family):
        if family not in made:
            path, ref = tiny(family)
            prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
            ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                tokens = ref.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)[
                    0, 7:
                ].tolist()
                logits = ref(ids).logits
            made[family] = (path, prompt[0], tokens, ids, logits)
        return made[family]

    return get


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory):
    from moepager.store.convert import convert

    made = {}

    def get(family):
        if family not in made:
            made[family] = convert(
                tiny(family)[0], tmp_path_factory.mktemp("stores") / family, progress=False
            )
        return made[family]

    return get


@pytest.mark.parametrize("source", ["safetensors", "store", "gguf"])
@pytest.mark.parametrize("family", PAGED)
def test_paged_matches_transformers_at_every_budget(references, stores, tmp_path, family, source):
    path, prompt, tokens, ids, logits = references(family)
    if source == "store":  # the expert-aligned store written by moepager convert, read with O_DIRECT
        path = stores(family)
    elif source == "gguf":  # stacked experts, read by byte range
        from test_gguf import ARCH, write_gguf

        if family not in ARCH:
            pytest.skip(f"moepager reads no {family} GGUF")
        write_gguf(path, tmp_path / "m.gguf")
        path = tmp_path / "m.gguf"
    probe = _load(path, expert_memory="100%")
    budgets = _budgets(probe)
    for budget in budgets:
        for prefetch in (True, False) if budget == budgets[2] else (True,):
            engine = _load(path, expert_memory=budget, prefetch=prefetch, policy="lru")
            assert engine.generate(prompt, max_new_tokens=24, stop_ids=[]) == tokens, (budget, prefetch)
            # a batch prefill routes to (nearly) every expert: small budgets run it in waves
            assert (engine.logits(ids) - logits).abs().max().item() < 1e-4, (budget, prefetch)
            s = engine.stats()["experts"]
            assert s["peak_resident_bytes"] <= s["allocated_bytes"]
            assert s["allocated_bytes"] <= max(budget, engine.config.top_k * s["slot_bytes"])
            assert s["misses"] > 0 and s["bytes_read"] > 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "nextuse"])
def test_every_policy_is_exact(references, policy):
    path, prompt, tokens, _, _ = references("qwen3_moe")
    engine = _load(path, expert_memory="40%", policy=policy)
    assert engine.generate(prompt, max_new_tokens=24, stop_ids=[]) == tokens
    assert engine.stats()["experts"]["policy"] == policy


def test_stats_per_layer_and_total(references):
    path, prompt, _, _, _ = references("qwen3_moe")
    engine = _load(path, expert_memory="50%", prefetch=True)
    engine.generate(prompt, max_new_tokens=16, stop_ids=[])
    s = engine.stats()["experts"]
    assert set(s["layers"]) == {"0", "2"}  # layer 1 is a dense MLP
    for name in ("hits", "misses", "prefetch_hits", "bytes_read", "evictions"):
        assert s[name] == sum(layer[name] for layer in s["layers"].values())
    steps = 16 * 2  # one step per token per MoE layer (prefill counts once)
    used = s["hits"] + s["misses"] + s["prefetch_hits"]
    assert used >= steps * engine.config.top_k // 2
    assert 0 <= s["prefetch"]["precision"] <= 1 and 0 <= s["prefetch"]["recall"] <= 1
    assert s["resident_bytes"] <= s["budget_bytes"]


def test_minimum_budget_warns_and_is_raised(references):
    path = references("mixtral")[0]
    with pytest.warns(UserWarning, match="below the minimum working set"):
        engine = moepager.load(path, expert_memory=1)
    assert engine.stats()["experts"]["capacity"] == engine.config.top_k


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "0", "-5MiB", "150%", ""])
def test_budget_errors_are_clear(references, bad):
    path = references("mixtral")[0]
    with pytest.raises(MoepagerError, match="expert_memory"):
        moepager.load(path, expert_memory=bad)


def test_memory_limit_below_dense_part_is_an_error(references):
    path = references("mixtral")[0]
    with pytest.raises(MoepagerError, match="below what the model needs.*raise the limit to at least"):
        moepager.load(path, memory_limit="10MiB")


def test_memory_limit_gives_the_rest_to_experts(references):
    import psutil

    path, prompt, tokens, _, _ = references("mixtral")
    probe = _load(path, expert_memory="100%")
    slot = probe.stats()["experts"]["slot_bytes"]
    rss = psutil.Process().memory_info().rss
    engine = _load(path, memory_limit=rss + 64 * 2**20 + 64 * 2**20, max_context=256)
    s = engine.stats()["experts"]
    assert slot <= s["allocated_bytes"] <= s["total_expert_bytes"]
    assert engine.generate(prompt, max_new_tokens=24, stop_ids=[]) == tokens


def test_residency_api(references):
    path = references("qwen3_moe")[0]
    engine = _load(path, expert_memory="50%", prefetch=False)
    x = engine.experts
    x.load(0, 3)
    assert (0, 3) in x.resident()
    x.release(0, 3)
    assert (0, 3) not in x.resident()
    x.pin(2, 5)
    engine.generate([1, 2, 3, 4], max_new_tokens=12, stop_ids=[])
    assert (2, 5) in x.resident()
    x.unpin(2, 5)
    with pytest.raises(MoepagerError, match="no such routed expert"):
        x.pin(1, 0)  # layer 1 is dense


def test_hot_set_round_trip(references, tmp_path):
    path, prompt, tokens, _, _ = references("qwen3_moe")
    engine = _load(path, expert_memory="50%")
    engine.generate(prompt, max_new_tokens=24, stop_ids=[])
    saved = engine.experts.save_hot_set(tmp_path / "hot.json", n=4)
    assert len(saved) == 4
    again = _load(path, expert_memory="50%", hot_set=tmp_path / "hot.json")
    assert set(saved) <= set(again.experts.resident())
    assert again.experts.cache.pinned() == saved
    assert again.generate(prompt, max_new_tokens=24, stop_ids=[]) == tokens
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(MoepagerError, match="not a hot set file"):
        _load(path, expert_memory="50%", hot_set=tmp_path / "bad.json")


def test_too_many_pins_is_an_error(references):
    path = references("mixtral")[0]
    with pytest.raises(MoepagerError, match="pin fewer"):
        _load(path, expert_memory=1, pins=[(0, 0)])


def test_record_trace(references):
    path, prompt, tokens, _, _ = references("mixtral")
    engine = _load(path, record_trace=True)
    assert engine.generate(prompt, max_new_tokens=5, stop_ids=[]) == tokens[:5]
    steps = engine.trace.steps
    assert len(steps) == 5 * engine.config.num_layers
    assert steps[0][0] == 0 and len(steps[0][1]) == 7 and len(steps[0][1][0]) == engine.config.top_k


def test_wrong_guesses_never_change_the_output(references):
    path, prompt, tokens, _, _ = references("qwen3_moe")
    engine = _load(path, expert_memory="50%", prefetch=True)
    engine.model.__class__ = (
        Transformer  # the layers, where the prefetcher's routers guess (a step graph's are nodes)
    )
    pf = engine.experts.prefetcher
    bad = torch.Generator().manual_seed(0)
    pf.routers = {
        layer: (lambda x: torch.randint(0, 16, (x.shape[0], 4), generator=bad)) for layer in pf.routers
    }
    assert engine.generate(prompt, max_new_tokens=24, stop_ids=[]) == tokens
    s = engine.stats()["experts"]
    assert s["prefetch_reads"] > 0 and s["prefetch"]["precision"] < 0.6
