"""Dense building blocks: norms, rotary embeddings, attention (GQA and MLA), the SwiGLU MLP, the KV cache.

Letters in shape comments: B batch, T new tokens, S cached + new tokens, H heads, Hk kv heads,
Dh head dim, D hidden, I intermediate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # the same arithmetic as below, one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32 like the reference, then scale in the weight's dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    return LayerNorm(dim, config.norm_eps) if config.norm == "layer" else RMSNorm(dim, config.norm_eps)


# ---------------------------------------------------------------------------------------------- RoPE


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(
    rope: dict, dim: int, max_positions: int, positions_seen: int = 0
) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention scaling) for the rope types that the supported families use."""
    base = rope["rope_theta"]
    kind = rope["rope_type"]
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponent)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        original = rope["original_max_position_embeddings"]
        factor = rope.get("factor") or max_positions / original
        attention_factor = rope.get("attention_factor")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attention_factor)
    if kind == "longrope":
        original = rope["original_max_position_embeddings"]
        factor = rope.get("factor") or max_positions / original
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        long = positions_seen > original
        ext = torch.tensor(rope["long_factor"] if long else rope["short_factor"], dtype=torch.float32)
        if "long_mscale" in rope:  # PhiMoE states its scaling per regime
            attention_factor = rope["long_mscale"] if long else rope["short_mscale"]
        return inv_freq / ext, float(attention_factor)
    raise ValueError(f"rope_type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, dim: int):
        super().__init__()
        self.rope, self.dim, self.max_positions = config.rope, dim, config.max_position_embeddings
        inv_freq, self.scaling = rope_frequencies(config.rope, dim, config.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (a row per sequence) -> cos, sin [..., T, dim] (frequencies repeated for both
        halves); sin carries rotate-half's sign (its first half negated), which apply_rope relies on."""
        inv_freq, scaling = self.inv_freq, self.scaling
        if self.rope["rope_type"] == "longrope":  # the factors depend on how long the sequence is
            if positions.dim() > 1:  # sequences of different lengths: one at a time
                rows = [self(row, dtype) for row in positions]
                return torch.stack([c for c, _ in rows]), torch.stack([s for _, s in rows])
            inv_freq, scaling = rope_frequencies(
                self.rope, self.dim, self.max_positions, int(positions.max()) + 1
            )
            inv_freq = inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
        half = self.dim // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False
) -> torch.Tensor:
    """x [B, H, T, Dr]; cos/sin [T, Dr]. Interleaved pairs come out de-interleaved, as in the reference."""
    half = x.shape[-1] // 2
    if interleave:
        cos, sin = cos[:, :half], sin[:, half:]  # the unsigned half of sin
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    # the reference's x * cos + cat(-x2, x1) * sin, with the minus folded into sin: two ops fewer per call
    return x * cos + x.roll(half, dims=-1) * sin


# ------------------------------------------------------------------------------------------ KV cache


class KVCache:
    """Keys and values of every layer, in buffers that grow by doubling (no per-token allocation), up to
    max_positions when given: a context planned under a memory limit then costs its K/V once, not up to twice."""

    def __init__(self, num_layers: int, max_positions: int | None = None):
        self.max_positions = max_positions
        self.k: list[torch.Tensor | None] = [None] * num_layers  # [B, Hk, capacity, Dk]
        self.v: list[torch.Tensor | None] = [None] * num_layers  # [B, Hk, capacity, Dv]
        self.length = [0] * num_layers
        # the values with positions in rows, for llama.cpp's attention (values_by_position), and how many
        # positions of them are up to date
        self.vt: list[torch.Tensor | None] = [None] * num_layers  # [B, Hk, Dv, capacity]
        self.mirrored = [0] * num_layers
        # what a one-graph decode step made of these buffers (model/ggml_decode.py), dropped whenever they change:
        # kept here, it lives and dies with them
        self.step_view = None

    @property
    def seq_len(self) -> int:
        return self.length[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k [B, Hk, T, Dk], v [B, Hk, T, Dv]; return every cached position [B, Hk, S, D]."""
        n, t = self.length[layer], k.shape[2]
        self.reserve(layer, n + t, k, v)
        self.k[layer][:, :, n : n + t] = k
        self.v[layer][:, :, n : n + t] = v
        self.length[layer] = n + t
        return self.k[layer][:, :, : n + t], self.v[layer][:, :, : n + t]

    def reserve(self, layer: int, size: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make room for `size` positions in `layer`, keeping what it holds; k, v: tensors shaped like what
        will be stored ([B, Hk, any, Dk] and [B, Hk, any, Dv])."""
        n, buf_k = self.length[layer], self.k[layer]
        if buf_k is not None and size <= buf_k.shape[2]:
            return
        capacity = max(2 * size, 64)
        if self.max_positions is not None:  # past the plan a buffer still grows, to exactly what is asked
            capacity = max(size, min(capacity, self.max_positions))
        # zeros, not garbage, past the length: llama.cpp's attention reads masked positions too (GgmlAttention)
        new_k = k.new_zeros(*k.shape[:2], capacity, k.shape[3])
        new_v = v.new_zeros(*v.shape[:2], capacity, v.shape[3])
        if n:
            new_k[:, :, :n] = buf_k[:, :, :n]
            new_v[:, :, :n] = self.v[layer][:, :, :n]
        self.k[layer], self.v[layer] = new_k, new_v
        self.step_view = None

    def truncate(self, n: int) -> None:
        """Keep only the first n positions (a conversation reusing the prefix it shares with the cache)."""
        if not 0 <= n <= min(self.length):
            raise ValueError(f"cannot truncate a cache of {self.seq_len} positions to {n}")
        self.length = [n] * len(self.length)
        self.mirrored = [min(m, n) for m in self.mirrored]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.vt if t is not None)

    def values_by_position(self, layer: int) -> torch.Tensor:
        """The layer's values [B, Hk, Dv, capacity] with positions in rows, as llama.cpp keeps its V cache for
        attention without flash attention (GgmlAttention): a second copy beside the values, brought up to date
        with the positions appended since the last call (copying them all each step cost 0.07 ms a layer at 256
        positions); zeros past what was ever filled."""
        v, vt, n = self.v[layer], self.vt[layer], self.length[layer]
        if vt is None or vt.shape[-1] != v.shape[2]:  # the values' buffer grew
            vt = self.vt[layer] = v.new_zeros(*v.shape[:2], v.shape[3], v.shape[2])
            self.mirrored[layer] = 0
            self.step_view = None
        m = self.mirrored[layer]
        if m < n:
            vt[..., m:n] = v[:, :, m:n].transpose(2, 3)
            self.mirrored[layer] = n
        return vt

    def attend(self, layer, q, k_new, v_new, mask, window, scale, sinks=None) -> torch.Tensor:
        """Append this step's keys/values and attend over every cached position (the layers call only this).

        mask [T, S] or None comes from attention_mask; window is for caches that skip what it hides."""
        k, v = self.update(layer, k_new, v_new)
        return attend(q, k, v, mask, scale, sinks)


def attention_mask(
    start: int, t: int, window: int | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive mask [T, S] for queries at positions start..start+T-1 over keys 0..start+T-1, or None when
    every query sees every key: one new token with no window, or within its window (the decode step)."""
    if t == 1 and (window is None or start < window):
        return None
    q = torch.arange(start, start + t, device=device)[:, None]
    k = torch.arange(start + t, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def attention_masks(
    windows: list[int | None], start: int, t: int, device: torch.device, dtype: torch.dtype
) -> dict[int | None, torch.Tensor | None]:
    """One forward step's masks by window, built once and shared by every layer with that window."""
    return {w: attention_mask(start, t, w, device, dtype) for w in set(windows)}


def attend(q, k, v, mask, scale, sinks=None) -> torch.Tensor:
    """q [B, H, T, Dk], k/v [B, Hk, S, D], mask [T, S] or None -> [B, T, H*Dv].
    Sinks [H] add one logit to each softmax row."""
    if sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
        if mask is not None:
            logits = logits + mask
        sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
        logits = torch.cat([logits, sink], dim=-1)
        probs = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
        out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).flatten(2)


class _Attention(nn.Module):
    """What both attentions share: this layer's mask, and attention over the cache when there is one."""

    layer: int
    window: int | None
    scale: float

    def attend(
        self, q, k, v, cache: KVCache | None, start: int, masks: dict | None, sinks=None
    ) -> torch.Tensor:
        """masks: the step's, by window (attention_masks); None builds this layer's own (no model around)."""
        if masks is None:
            masks = attention_masks([self.window], start, q.shape[2], q.device, q.dtype)
        if cache is None:
            return attend(q, k, v, masks[self.window], self.scale, sinks)
        return cache.attend(self.layer, q, k, v, masks[self.window], self.window, self.scale, sinks)


class Attention(_Attention):
    """Grouped-query attention with the per-family options as config fields."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        d, h, hk, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.layer, self.h, self.hk, self.dh = layer, h, hk, dh
        self.window = config.sliding_windows[layer]
        self.clip = config.clip_qkv
        self.q_proj = nn.Linear(d, h * dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, hk * dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, hk * dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * dh, d, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":
            self.q_norm, self.k_norm = make_norm(config, dh), make_norm(config, dh)
        elif config.qk_norm == "full":
            self.q_norm, self.k_norm = make_norm(config, h * dh), make_norm(config, hk * dh)
        self.sinks = nn.Parameter(torch.zeros(h)) if config.attention_sinks else None
        self.scale = dh**-0.5

    def forward(
        self, x: torch.Tensor, rope: tuple, cache: KVCache | None, start: int, masks: dict | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*Dh], [B, T, Hk*Dh] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(b, t, self.h, self.dh)
        k = k.view(b, t, self.hk, self.dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, Dh], [B, Hk, T, Dh]
        v = v.view(b, t, self.hk, self.dh).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(self.attend(q, k, v, cache, start, masks, self.sinks))


class LatentKV(nn.Linear):
    """MLA's kv_b_proj [H * (nope + Dv), kv_rank], used the way llama.cpp runs MLA (and DeepSeek's papers
    describe its decoding): never expanded per position, but absorbed into the query and the output. Its k
    rows take each head's query into the latent's space (absorb), its v rows take each head's attention
    output, a mix of latents, to the head's values (expand). The same products as expanding K and V, in
    another order; the cache holds one latent per position instead of H keys and values."""

    def __init__(self, kv_rank: int, heads: int, nope: int, dv: int):
        super().__init__(kv_rank, heads * (nope + dv), bias=False)
        self.heads, self.nope, self.dv = heads, nope, dv

    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.view(self.heads, self.nope + self.dv, self.in_features)
        return w[:, : self.nope], w[:, self.nope :]  # [H, nope, kv_rank], [H, Dv, kv_rank]

    def absorb(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, nope] -> [B, H, T, kv_rank]"""
        return torch.matmul(q, self._split()[0])

    def expand(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, kv_rank] -> [B, T, H, Dv]"""
        return torch.einsum("bthr,hdr->bthd", o, self._split()[1])


class MLAttention(_Attention):
    """DeepSeek's multi-head latent attention: K and V come from a low-rank latent shared by all heads. Run
    as multi-query attention over the latent (LatentKV): one cached key of kv_rank + rope dims per position
    (the latent and the rotated part), whose first kv_rank dims are also its value."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        d, h = config.hidden_size, config.num_heads
        self.layer, self.h = layer, h
        self.nope, self.rope_dim, self.dv = config.qk_nope_head_dim, config.rope_dim, config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.window = config.sliding_windows[layer]
        dq = self.nope + self.rope_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_rank + self.rope_dim, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, 1e-6)
        self.kv_b_proj = LatentKV(self.kv_rank, h, self.nope, self.dv)
        self.o_proj = nn.Linear(h * self.dv, d, bias=config.o_bias)
        self.interleave = config.rope_interleave
        self.scale = dq**-0.5
        if config.rope["rope_type"] != "default" and config.rope.get("mscale_all_dim"):
            m = _yarn_mscale(config.rope["factor"], config.rope["mscale_all_dim"])
            self.scale *= m * m

    def forward(
        self, x: torch.Tensor, rope: tuple, cache: KVCache | None, start: int, masks: dict | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.h, -1).transpose(1, 2)  # [B, H, T, nope+rope]
        q_pass, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, t, self.kv_rank)
        cos, sin = rope
        q_rot = apply_rope(q_rot, cos, sin, self.interleave)
        k_rot = apply_rope(k_rot.view(b, 1, t, self.rope_dim), cos, sin, self.interleave)
        q = torch.cat((self.kv_b_proj.absorb(q_pass), q_rot), dim=-1)  # [B, H, T, kv_rank + rope]
        k = torch.cat((latent, k_rot), dim=-1)  # [B, 1, T, kv_rank + rope]
        o = self.attend(q, k, latent, cache, start, masks).view(b, t, self.h, self.kv_rank)
        return self.o_proj(self.kv_b_proj.expand(o).flatten(2))


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
