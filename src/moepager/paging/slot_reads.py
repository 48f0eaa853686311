"""How an expert's bytes get into a slot of the expert cache (paging/cache.py): straight from the source's reads,
each tensor repacked into the bank's layout as it lands, or through a reading thread's own staging set (slots of
another dtype, or slots on a GPU, copied on that thread's stream). No bookkeeping: the cache claims the slots,
counts the reads and decides what a failed one drops."""

from __future__ import annotations

import threading

import torch

from ..model.moe import ExpertWeights

Key = tuple[int, int]  # (layer, expert)


class SlotReads:
    def __init__(
        self, source, banks: dict, direct: bool, shapes: dict, src_dtype: dict, device: torch.device
    ):
        """direct: a read lands straight in the slot (the slots have the source's dtype and live in RAM)."""
        self.source, self.banks, self.direct = source, banks, direct
        self.views = next(iter(banks.values())).slots
        self.shapes, self.src_dtype, self.device = shapes, src_dtype, device
        self._staging = threading.local()
        self.slot_events: dict[int, torch.cuda.Event] = {}  # slot -> its last compute, which a copy waits for

    def read(self, batch: list[tuple[Key, int]]) -> None:
        """Read the keys of batch into their slots. Runs in any thread."""
        # tensors repacked straight from the read's staging (one copy less each), per key of the batch
        landed = [set() for _ in batch]

        def land(i: int, name: str, source: torch.Tensor) -> bool:
            (layer, _), slot = batch[i]
            if not self.banks[layer].land(slot, name, source):
                return False
            landed[i].add(name)
            return True

        if self.direct and hasattr(self.source, "read_experts"):  # one call: the source merges neighbours
            self.source.read_experts([k for k, _ in batch], [self.views[s] for _, s in batch], land)
        else:
            for key, slot in batch:
                if self.direct:
                    self.source.read_expert(*key, out=self.views[slot])
                else:
                    self._read_staged(key, slot)
        for i, ((layer, _), slot) in enumerate(batch):
            self.banks[layer].repack_slot(slot, landed[i])

    def _read_staged(self, key: Key, slot: int) -> None:
        """Through this thread's staging set: another dtype in the slots, or slots on a GPU."""
        staged = self.source.read_expert(*key, out=self._staging_buffers())
        stream = self._staging.stream
        if stream is None:
            for n, t in staged.items():
                self.views[slot][n].copy_(t)
            return
        with torch.cuda.stream(stream):
            if (event := self.slot_events.get(slot)) is not None:
                stream.wait_event(event)  # the slot's previous expert may still be computing
            for n, t in staged.items():
                self.views[slot][n].copy_(t, non_blocking=True)
        stream.synchronize()  # staging is reused by this thread's next read

    def _staging_buffers(self) -> ExpertWeights:
        buf = getattr(self._staging, "buf", None)
        if buf is None:  # one set per reading thread, allocated on its first read
            pin = self.device.type == "cuda"  # pinned RAM: the copies to the GPU run without the CPU
            buf = {n: torch.empty(s, dtype=self.src_dtype[n], pin_memory=pin) for n, s in self.shapes.items()}
            self._staging.buf = buf
            self._staging.stream = torch.cuda.Stream(self.device) if pin else None
        return buf
