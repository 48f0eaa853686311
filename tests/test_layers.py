"""Rotary embeddings and attention masks against transformers' own functions and a brute-force mask."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from moepager.model.config import config_from_hf
from moepager.model.layers import RotaryEmbedding, apply_rope, attend, attention_mask


def _rotary(hf_config) -> RotaryEmbedding:
    config = config_from_hf(hf_config.to_dict())
    return RotaryEmbedding(config, config.rope_dim or config.head_dim)


@pytest.mark.parametrize("interleave", [False, True])
def test_rope_matches_transformers(interleave):
    hf_config = tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ref = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    q, k = torch.randn(2, 4, 12, 16), torch.randn(2, 2, 12, 16)
    positions = torch.arange(5, 17)
    cos, sin = ref(q, positions[None])
    rotate = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    expected_q, expected_k = rotate(q, k, cos, sin)
    cos, sin = _rotary(hf_config)(positions, torch.float32)
    torch.testing.assert_close(apply_rope(q, cos, sin, interleave), expected_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin, interleave), expected_k, rtol=0, atol=1e-6)


def test_longrope_rows_are_sequences_of_their_own_length():
    """decode_batch asks for one position per sequence: each row takes the factors of its own length."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0] * 4, "long_factor": [4.0] * 4,
            "short_mscale": 1.0, "long_mscale": 1.5}  # fmt: skip
    rotary = RotaryEmbedding(SimpleNamespace(rope=rope, max_position_embeddings=64), 8)
    positions = torch.tensor([3, 40, 15, 16])
    cos, sin = rotary(positions[:, None], torch.float32)  # [B, 1, 8]
    for i, p in enumerate(positions):
        alone = rotary(p.view(1), torch.float32)
        assert torch.equal(cos[i], alone[0]) and torch.equal(sin[i], alone[1])
    assert not torch.equal(cos[0], rotary(torch.tensor([3, 40]), torch.float32)[0][:1])  # the regimes differ


def _brute_force_mask(start, t, window):
    mask = torch.full((t, start + t), float("-inf"))
    for i in range(t):
        q = start + i
        for k in range(start + t):
            if k <= q and (window is None or q - k < window):
                mask[i, k] = 0.0
    return mask


@pytest.mark.parametrize("start, t, window", [(0, 6, None), (4, 3, None), (0, 12, 4), (9, 3, 4), (5, 1, 4)])
def test_attention_mask(start, t, window):
    got = attention_mask(start, t, window, torch.device("cpu"), torch.float32)
    assert torch.equal(got, _brute_force_mask(start, t, window))


@pytest.mark.parametrize("start, window", [(0, None), (20, None), (3, 4), (4, 4), (9, 4)])
def test_one_new_token_is_unmasked_when_it_sees_every_key(start, window):
    got = attention_mask(start, 1, window, torch.device("cpu"), torch.float32)
    sees_all = bool((_brute_force_mask(start, 1, window) == 0).all())
    assert (got is None) == sees_all


@pytest.mark.parametrize("sinks", [None, torch.randn(4)])
def test_attend_without_a_mask_is_attend_with_a_zero_mask(sinks):
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    torch.testing.assert_close(
        attend(q, k, v, None, 0.3, sinks), attend(q, k, v, torch.zeros(1, 10), 0.3, sinks)
    )
