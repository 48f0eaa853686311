"""Every family against transformers: logits, greedy generation, and the KV-cache path."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB

import moepager


@pytest.fixture(scope="module")
def engines():
    return {}


def _engine(tiny, engines, family):
    if family not in engines:
        path, ref = tiny(family)
        engines[family] = (moepager.load(path), ref)
    return engines[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny, engines, family):
    engine, ref = _engine(tiny, engines, family)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    got = engine.logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(tiny, engines, family):
    engine, ref = _engine(tiny, engines, family)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 7:].tolist()
    assert engine.generate(prompt[0], max_new_tokens=32, stop_ids=[]) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_matches_full_forward(tiny, engines, family):
    from moepager.layers import KVCache

    engine, _ = _engine(tiny, engines, family)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    full = engine.logits(ids)
    cache = KVCache(engine.config.num_layers)
    with torch.inference_mode():
        steps = [engine.model(ids[:, :8], cache)]
        for t in range(8, 14):
            steps.append(engine.model(ids[:, t : t + 1], cache))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4
