"""One decoder for every supported family. Family differences are ModelConfig fields, not code paths.

The model holds the resident weights (embeddings, attention, norms, routers, shared experts, dense MLPs).
Routed experts are reached only through the Experts contract (model/moe.py); this module never imports the
store, the cache or the prefetcher.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import MLP, Attention, KVCache, MLAttention, RotaryEmbedding, attention_masks, make_norm
from .moe import Experts, MoE


def weight_storages(model: nn.Module) -> dict[int, int]:
    """The memory a model's parameters and buffers hold: {storage address: bytes}, each storage once (tied
    weights share one)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers()]}  # fmt: skip


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.hidden_size)
        self.attn = (MLAttention if config.attention == "mla" else Attention)(config, layer)
        self.ffn_norm = make_norm(config, config.hidden_size)
        if config.moe_layers[layer]:
            self.ffn = MoE(config, layer)
        else:
            self.ffn = MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, rope: tuple, cache: KVCache | None, start: int, masks: dict
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, start, masks)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # weights are always loaded afterwards; an initial draw on the meta device would import torch's compiler
        # stack (~70 MiB of RSS) for nothing
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size,
                                  config.hidden_size))  # fmt: skip
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        rope_dim = config.rope_dim or config.head_dim
        with torch.device("cpu"):  # computed, not loaded: keep it real even when built on meta
            self.rotary = RotaryEmbedding(config, rope_dim)

    def set_experts(self, experts: Experts) -> None:
        """Plug an implementation of the experts contract into every MoE layer."""
        for block in self.layers:
            if isinstance(block.ffn, MoE):
                block.ffn.experts = experts

    def forward(
        self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only). Continues the cache if given."""
        start, t = (cache.seq_len if cache is not None else 0), ids.shape[1]
        x = self.embed(ids)  # [B, T, D]
        rope = self.rotary(torch.arange(start, start + t, device=ids.device), x.dtype)  # cos, sin [T, Dr]
        # the masks are built once per step, not per layer (none at all for a decoded token without a window)
        masks = attention_masks(self.config.sliding_windows, start, t, ids.device, x.dtype)
        for block in self.layers:
            x = block(x, rope, cache, start, masks)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def decode_batch(self, tokens: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decode step for B sequences of different lengths: tokens [B] -> logits [B, V].

        Attention runs per sequence on its own cache and position; norms, MoE and lm_head run on the
        whole batch, so each MoE layer routes all B tokens together and calls each needed expert once.
        """
        starts = [c.seq_len for c in caches]  # read before layer 0 appends to the caches
        x = self.embed(tokens)[:, None]  # [B, 1, D]
        cos, sin = self.rotary(torch.tensor(starts, device=tokens.device)[:, None], x.dtype)  # [B, 1, Dr]
        ropes = list(zip(cos, sin))  # one ([1, Dr], [1, Dr]) per sequence
        windows, device = self.config.sliding_windows, tokens.device
        masks = [attention_masks(windows, s, 1, device, x.dtype) for s in starts]  # all None without windows
        seqs = list(zip(caches, starts, ropes, masks))
        for block in self.layers:
            h = block.attn_norm(x)
            x = x + torch.cat([block.attn(h[i : i + 1], r, c, s, m) for i, (c, s, r, m) in enumerate(seqs)])
            x = x + block.ffn(block.ffn_norm(x))
        return self.lm_head(self.norm(x))[:, 0]
