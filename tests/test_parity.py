"""Every family against transformers: logits, greedy generation, and the KV-cache path."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, assert_like_reference, build, record_gpt_oss_projections

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
    from moepager.model.layers import KVCache

    engine, _ = _engine(tiny, engines, family)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    full = engine.logits(ids)
    cache = KVCache(engine.config.num_layers)
    with torch.inference_mode():
        steps = [engine.model(ids[:, :8], cache)]
        for t in range(8, 14):
            steps.append(engine.model(ids[:, t : t + 1], cache))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_gpt_oss_clamp_is_reached_and_matches_transformers(tmp_path):
    """GPT-OSS clamps its experts' gate (above) and up (both sides) projections at swiglu_limit. The tiny model's
    projections stay near 1, below the real limit of 7, so the limit is lowered to where a tenth of them pass it."""
    limit = 0.5
    ref = build("gpt_oss", tmp_path, swiglu_limit=limit)
    seen = record_gpt_oss_projections(ref)  # each expert call's projections, before clamping
    engine = moepager.load(tmp_path)
    assert engine.config.swiglu_limit == limit
    assert_like_reference(engine, ref)
    # [tokens * K, 2I], gate and up interleaved
    gate_up = torch.cat([g.reshape(-1, g.shape[-1]) for g in seen])
    gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    assert gate.max() > limit and up.max() > limit and up.min() < -limit
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clamped = ref(ids).logits
        for layer in ref.model.layers:
            layer.mlp.experts.limit = 7.0
        unclamped = ref(ids).logits
    assert (clamped - unclamped).abs().max() > 1e-2  # the clamp changes the output, beyond the 1e-4 tolerance


@pytest.mark.parametrize("family", FAMILIES)
def test_every_bias_and_norm_weight_moves_the_logits(tiny, family):
    """Each bias, norm weight, sink and correction bias of the tiny models, put back to transformers' initial
    value (zero, one), moves the logits past the 1e-4 tolerance: an engine that ignored it would fail the tests."""
    import re

    _, ref = tiny(family)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    tensors = dict(ref.named_parameters())
    tensors.update((n, b) for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias"))
    kinds = {}  # the name without its layer number -> the tensors of every layer
    for name, t in tensors.items():
        if t.dim() == 1 or name.endswith(("_bias", "sinks")):
            kinds.setdefault(re.sub(r"\.\d+\.", ".N.", name), []).append(t)
    assert kinds
    with torch.no_grad():
        expected = ref(ids).logits
        for kind, group in kinds.items():
            saved = [t.clone() for t in group]
            for t in group:
                t.fill_(1.0 if kind.endswith("norm.weight") else 0.0)
            moved = (ref(ids).logits - expected).abs().max().item()
            for t, s in zip(group, saved):
                t.copy_(s)
            assert moved > 1e-3, kind
