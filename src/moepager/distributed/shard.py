"""What one expert actor runs: a subset of a model's routed experts, held resident or paged from this node's
copy of the model, and the per-pair expert outputs the driver asks for.

An ExpertShard opens the model itself (the same path on every node), so only activations travel. Its experts
sit in the same banks as in one process (moe.bank_spec; an ExpertCache over just its experts when it has a
byte budget) and are computed by the same kernels, pair by pair exactly as moe.switch_glu computes them; the
driver then weighs and sums the pairs in switch_glu's order, so a distributed run gives the same bits as one
process. This module does not import Ray: the driver wraps the class as an actor.

Letters: P (token, expert) pairs sent to this shard, n distinct tokens among them, D hidden.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..model.config import ModelConfig
from ..model.moe import ExpertBank, activation, bank_spec
from ..sources.contract import expert_formats
from ..store.open_model import open_source
from ..system.process_memory import current_rss

Key = tuple[int, int]  # (layer, expert)
Wire = tuple[str, np.ndarray]  # a tensor as it travels: dtype name and a numpy array of its bytes


def to_wire(t: torch.Tensor) -> Wire:
    """A CPU numpy form of t (bfloat16, which numpy lacks, travels as its int16 bits)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return "bfloat16", t.view(torch.int16).numpy()
    return str(t.dtype).removeprefix("torch."), t.numpy()


def from_wire(w: Wire) -> torch.Tensor:
    name, a = w
    t = torch.from_numpy(a if a.flags.writeable else a.copy())  # arrays from Ray's object store are read-only
    return t.view(torch.bfloat16) if name == "bfloat16" else t


class SubsetSource:
    """A ModelSource showing only some of its routed experts, so a cache or bank sized from it holds just
    those. Everything else is the wrapped source's."""

    def __init__(self, source, keys: list[Key]):
        self._source, self._keys = source, sorted(keys)

    def expert_keys(self) -> list[Key]:
        return list(self._keys)

    def __getattr__(self, name):
        return getattr(self._source, name)


def pair_outputs(bank: ExpertBank, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, grouped: bool,
                 config: ModelConfig) -> torch.Tensor:  # fmt: skip
    """Unweighted expert outputs [P, D] of pairs (token x[rows[p]], expert in slots[p]), as switch_glu
    computes each pair: the gathered kernels (decode), or one pass per expert over its tokens (grouped, pairs
    sorted by expert)."""
    if grouped:
        out = x.new_empty(len(rows), x.shape[1])
        bounds = torch.nonzero(slots[1:] != slots[:-1]).flatten().add(1).tolist()
        for a, b in zip([0, *bounds], [*bounds, len(slots)]):
            out[a:b] = bank.expert(x[rows[a:b]], int(slots[a]), config)
        return out
    s = slots[:, None]  # [P, 1]: each pair is a token with one expert
    out = bank.swiglu_pairs(x[rows], s, config)  # GGUF blocks: as moe.gathered computes them
    if out is None:
        gate, up = bank.gate_and_up(x[rows], s)  # [P, 1, I]
        out = bank.down.gather_mv(activation(gate, up, config), s)  # [P, 1, D]
        if bank.down_bias is not None:
            out = out + bank.down_bias[s].to(out.dtype)
    return out[:, 0]


class ExpertShard:
    """The experts `keys` of the model at `path`: all resident (budget None) or paged in `budget` bytes (a size
    or a share of this shard's experts, as expert_memory). experts_dtype converts them as read (lossy)."""

    def __init__(self, path: str, keys: list[Key], budget: int | str | None = None,
                 dtype: torch.dtype | None = None, experts_dtype: str | None = None, policy: str | None = None):  # fmt: skip
        t0 = time.perf_counter()
        source = open_source(path)
        if experts_dtype is not None:
            from ..store.encoding import QuantizingSource

            source = QuantizingSource(source, experts_dtype)
        self.config: ModelConfig = source.config
        self.keys = sorted(keys)
        self.source = SubsetSource(source, self.keys)
        self.cache = None
        self.banks: dict[int, ExpertBank] = {}
        # layer -> expert id -> slot in that layer's resident bank (-1: not held here)
        self.slot_of: dict[int, torch.Tensor] = {}
        layers = sorted({layer for layer, _ in self.keys})
        if budget is None:
            spec = bank_spec(source.read_expert(*self.keys[0]), expert_formats(source), dtype)
            for layer in layers:
                mine = [e for l, e in self.keys if l == layer]
                self.banks[layer] = spec.for_layer(layer).allocate(len(mine), "cpu", layer)
                self.slot_of[layer] = torch.full((self.config.num_experts,), -1, dtype=torch.long)
                self.slot_of[layer][mine] = torch.arange(len(mine))
                self._read([(layer, e) for e in mine], self.banks[layer].slots)
                for slot in range(len(mine)):
                    self.banks[layer].repack_slot(slot)
        else:
            from ..paging.cache import ExpertCache

            self.cache = ExpertCache(self.source, self.config, budget, "cpu", dtype, policy)
            self._held = torch.full((self.config.num_experts,), -1, dtype=torch.long)
        self.load_s = time.perf_counter() - t0
        self.calls, self.compute_s = 0, 0.0

    def _read(self, keys: list[Key], outs: list) -> None:
        if hasattr(self.source, "read_experts"):  # neighbouring experts in a few large reads
            self.source.read_experts(keys, outs)
            return
        for key, out in zip(keys, outs):
            self.source.read_expert(*key, out=out)

    def ready(self) -> dict:
        """Where this shard runs, once its experts are loaded."""
        import socket

        banks = self.banks or self.cache.banks
        fused = all(
            bank.fused_swiglu(self.config) for bank in banks.values()
        )  # GGUF: summed in llama.cpp's order
        return {"pid": os.getpid(), "host": socket.gethostname(), "experts": len(self.keys),
                "paged": self.cache is not None, "load_s": self.load_s, "fused": fused}  # fmt: skip

    def compute(
        self, layer: int, x: Wire, rows: np.ndarray, experts: np.ndarray, grouped: bool
    ) -> tuple[Wire, float]:
        """x [n, D], rows [P] (into x), experts [P] (ascending) -> (the pairs' unweighted outputs [P, D], the
        seconds computing them: the driver tells its wait for the wire from the work)."""
        t0 = time.perf_counter()
        xt, rows_t, experts_t = from_wire(x), torch.from_numpy(rows), torch.from_numpy(experts)
        with torch.inference_mode():
            if self.cache is None:
                bank = self.banks[layer]
                out = pair_outputs(bank, xt, rows_t, self.slot_of[layer][experts_t], grouped, self.config)
            else:
                out = self._paged(layer, xt, rows_t, experts_t, grouped)
        dt = time.perf_counter() - t0
        self.calls += 1
        self.compute_s += dt
        return to_wire(out), dt

    def _paged(self, layer, x, rows, experts, grouped) -> torch.Tensor:
        """As PagedExperts: acquire the layer's experts from the cache (in waves when they do not all fit),
        compute the pairs of each wave, release. Pairs are independent, so waves do not change the result."""
        out = None
        pending = torch.unique(experts).tolist()
        while pending:
            held = self.cache.acquire(layer, pending)  # {expert: slot}
            self._held.fill_(-1)
            self._held[list(held)] = torch.tensor(list(held.values()))
            slots = self._held[experts]
            sel = torch.nonzero(slots >= 0).flatten()
            part = pair_outputs(self.cache.banks[layer], x, rows[sel], slots[sel], grouped, self.config)
            if out is None:
                out = part.new_empty(len(rows), part.shape[1])
            out[sel] = part
            self.cache.release_held(layer, held)
            pending = [e for e in pending if e not in held]
        return out

    def stats(self) -> dict:
        out = {**self.ready(), "calls": self.calls, "compute_s": self.compute_s, "expert_bytes": self.nbytes(),
               "rss_bytes": current_rss()}  # fmt: skip
        if self.cache is not None:
            out["cache"] = self.cache.stats()
        return out

    def nbytes(self) -> int:
        if self.cache is not None:
            return self.cache.capacity * self.cache.slot_bytes
        return sum(b.nbytes for b in self.banks.values())
