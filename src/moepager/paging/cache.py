"""The expert cache: a byte budget of preallocated slots holding routed experts, filled from a ModelSource.

Owns the budget (parsing, the minimum working set), the slots (allocated once, reused on every miss), which
expert sits in which slot (Residency), what may not be evicted (experts in use by the current layer, experts
being read, pins), the reads themselves (demand reads and background prefetch reads; how their bytes land in a
slot: slot_reads.py), each layer's slot table that a decoded token's graph looks its experts up in, and the
stats (their counters: cache_stats.py). Which expert to evict is the policy's choice (policies.py). What to
prefetch is prefetch.py's; how experts are computed is model/moe.py's.

Reads go in batches: a layer step claims all its slots at once (one pass of the policy), then hands its
misses to the source in at most io_threads batches of neighbouring experts (ModelSource.read_experts, which
merges them into a few large reads); guesses go to the prefetch thread in a few batches, and those still
queued when their layer runs are cancelled (wrong) or read with the misses (right).

Tiers: the slots live on the compute device (GPU memory for CUDA, read through pinned RAM staging
buffers; RAM for the CPU); below them is the source on disk.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import MoepagerError
from ..kernels import hugepages
from ..model.config import ModelConfig
from ..model.moe import ExpertBank, bank_spec
from ..sources.contract import expert_formats
from ..system.sizes import format_bytes, parse_bytes
from .cache_stats import CacheStats, activity, summary
from .policies import Policy, make_policy
from .residency import Residency
from .slot_reads import SlotReads

Key = tuple[int, int]  # (layer, expert)


class ExpertCache:
    """Routed experts of one model in a byte budget of slots on `device`, read from `source` on demand."""

    def __init__(self, source, config: ModelConfig, budget: int | str | None, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, policy: str | Policy | None = None, io_threads: int = 2,
                 limit: int | None = None):  # fmt: skip
        """budget: bytes, a size string or a percentage of all expert bytes; None = every expert.
        limit: bytes left for the cache by a whole-process memory limit (its staging buffers included)."""
        self.source, self.config, self.device = source, config, torch.device(device)
        keys = source.expert_keys()
        if not keys:
            raise MoepagerError(f"{source.path}: this model has no routed experts to page")
        template = source.read_expert(*keys[0])
        self.src_dtype = {n: t.dtype for n, t in template.items()}
        self.shapes = {n: tuple(t.shape) for n, t in template.items()}
        # the slots are an ExpertBank: the model computes straight from them (moe.switch_glu)
        spec = bank_spec(template, expert_formats(source), dtype)
        self.dtypes = spec.dtypes()
        self.slot_bytes = spec.slot_bytes
        self.total_bytes = self.slot_bytes * len(keys)
        self.num_keys = len(keys)

        self.budget_bytes = self.total_bytes if budget is None else parse_bytes(budget, self.total_bytes)
        pin = self.device.type == "cuda"
        self.direct = not pin and self.dtypes == self.src_dtype
        self.staging_bytes = (
            0
            if self.direct
            else (io_threads + 2)
            * sum(torch.Size(s).numel() * self.src_dtype[n].itemsize for n, s in self.shapes.items())
        )  # one staging set per reading thread
        if limit is not None:
            self.budget_bytes = max(0, min(self.budget_bytes, limit - self.staging_bytes))
        capacity = min(self.budget_bytes // self.slot_bytes, len(keys))
        self.min_slots = min(config.top_k, len(keys))
        if capacity < self.min_slots:
            warnings.warn(
                f"expert memory {format_bytes(self.budget_bytes)} holds {capacity} experts, below the minimum "
                f"working set (top_k = {self.min_slots} experts of {format_bytes(self.slot_bytes)}); raised to "
                f"{format_bytes(self.min_slots * self.slot_bytes)}",
                stacklevel=2,
            )
            capacity = self.min_slots
        self.capacity = capacity
        # one tensor per part holding every slot: allocated once, never per miss
        storage = spec.storage(capacity, self.device)
        for t in storage.values():  # backed now: a slot's first touch cost more than its read (hugepages.py)
            hugepages.populate(t, "expert cache memory")
        layers = sorted({layer for layer, _ in keys})
        # one view of the slots per layer: block-quantized experts may differ in type from layer to layer
        self.banks = {layer: ExpertBank(spec, storage, layer) for layer in layers}
        self.views = self.banks[layers[0]].slots
        self.reads = SlotReads(source, self.banks, self.direct, self.shapes, self.src_dtype, self.device)

        self.lock = threading.Lock()
        # held by a layer step (acquire) and by a decode step's graph across all its layers (decode_step_paged),
        # so that nothing evicts an expert a graph found in `tables` before its products ran
        self.stepping = threading.RLock()
        # per layer, each expert's slot once its bytes are in it, else -1: what a decode step's graph looks up
        self.tables = {layer: torch.full((config.num_experts,), -1, dtype=torch.int32) for layer in layers}
        self.res = Residency(capacity, make_policy(policy))
        self.res.on_evict = self._unlisted
        self.policy = self.res.policy
        # key -> its read in flight (_DONE: read by the step that wants it)
        self.loading: dict[Key, Future] = {}
        # guesses whose prefetch batch has not started -> that batch's ticket
        self.queued: dict[Key, object] = {}
        self.prefetched: set[Key] = set()  # arrived by prefetch, not used since
        self.uses: dict[Key, int] = {}  # layer steps that used each expert (for hot sets)
        # per expert, reads on demand, reads by prefetch and evictions: what a live view diffs to draw activity
        self.demand_reads: dict[Key, int] = {}
        self.prefetch_reads: dict[Key, int] = {}
        self.evicted: dict[Key, int] = {}
        self.layer_stats: dict[int, CacheStats] = {}
        self.peak_resident_bytes = 0
        self.io_threads = max(1, io_threads)  # a step's misses are read in at most this many batches at once
        self.pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="moepager-read")
        self.prefetch_pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="moepager-prefetch")

    # -------------------------------------------------------------------------------- reads

    def _stats(self, layer: int) -> CacheStats:
        if layer not in self.layer_stats:
            self.layer_stats[layer] = CacheStats()
        return self.layer_stats[layer]

    def _fill(self, batch: list[tuple[Key, int]], prefetch: bool) -> None:
        """Read a batch of keys into their slots. Runs in any thread, without the lock."""
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            self.reads.read(batch)
        except BaseException:
            with self.lock:
                self._drop_failed(batch)
            raise
        share = (time.perf_counter() - t0) / len(batch)
        with self.lock:
            for key, slot in batch:
                st = self._stats(key[0])
                st.read_s += share
                st.bytes_read += self.source.expert_nbytes(*key)
                counts = self.prefetch_reads if prefetch else self.demand_reads
                counts[key] = counts.get(key, 0) + 1
                if prefetch:
                    st.prefetch_reads += 1
                    self.prefetched.add(key)
                    self.res.drop(key)
                self.loading.pop(key, None)
                self.tables[key[0]][key[1]] = slot  # its bytes are in: a step graph may find it

    def _drop_failed(self, batch: list[tuple[Key, int]]) -> None:
        """A read failed: every slot of its batch may hold garbage, so each key leaves the cache with all its
        holds (the step that wanted it lets go of it in acquire's cleanup). Holds the lock."""
        for key, _ in batch:
            self.loading.pop(key, None)
            self.queued.pop(key, None)
            self.prefetched.discard(key)
            self.res.in_use.pop(key, None)
            if key in self.res.slot:
                self.res.release(key)

    def _claim(self, keys: list[Key], may_evict=None) -> list[tuple[Key, int]]:
        """Slots for as many of keys (none resident) as can be had, in order. Holds the lock."""
        got = self.res.claim_many(keys, may_evict)
        for _, _, evicted in got:
            if evicted is not None:
                self._stats(evicted[0]).evictions += 1
                self.evicted[evicted] = self.evicted.get(evicted, 0) + 1
                if evicted in self.prefetched:
                    self.prefetched.discard(evicted)
                    self._stats(evicted[0]).prefetch_wasted += 1
        self.peak_resident_bytes = max(self.peak_resident_bytes, len(self.res.slot) * self.slot_bytes)
        return [(key, slot) for key, slot, _ in got]

    # -------------------------------------------------------------------------------- layer steps

    def acquire(self, layer: int, experts: Iterable[int], before_wait=None, done=None) -> dict[int, int]:
        """Make experts of `layer` resident and hold them until `release_held`. Returns {expert: slot} of
        as many as fit (every requested expert that is resident, then misses in order while a slot can be
        had): call again with the rest after releasing, so a layer whose experts exceed the budget runs in
        waves.
        `before_wait` runs once this step's slots are claimed and its reads started, if they all fit (prefetch
        goes there: it overlaps this step's reads and compute, never takes their slots). `done`: (layer,
        experts) to release_held first, in the same pass (a decoded token's previous layer).

        The misses go to the source in at most io_threads batches of neighbouring keys, one per reading thread
        (the first in this thread), so a step costs a few large reads, not one small read and handoff per
        expert."""
        with self.stepping:
            return self._acquire(layer, experts, before_wait, done)

    def _acquire(self, layer: int, experts: Iterable[int], before_wait, done) -> dict[int, int]:
        experts = list(experts)
        if done is not None and self.device.type == "cuda":  # its slots get events: release_held's way
            self.release_held(*done)
            done = None
        with self.lock:
            if done is not None:
                self._let_go(*done)
            held = self._hold_resident(layer, experts) if before_wait is None else None
        if held is not None:
            return held
        while True:
            held, reads, waits = self._reserve(layer, experts)
            if held:
                break
            with self.lock:  # every slot is busy with reads in flight: let them land, then retry
                inflight = list(self.loading.values())
            if not inflight:
                raise RuntimeError(
                    f"expert cache: no slot can be freed for layer {layer} (capacity {self.capacity})"
                )
            for f in inflight:
                f.exception()
        if not reads and not waits:  # the common step: every expert here already, nothing to read or wait for
            try:
                if before_wait is not None and len(held) == len(experts):
                    before_wait()
            except BaseException:
                self._abandon(layer, held, [], [])
                raise
            with self.lock:
                return self._used(layer, held)
        t0 = time.perf_counter()
        batches = _split(reads, self.io_threads) or [[]]
        futures = [self.pool.submit(self._fill, b, False) for b in batches[1:]]
        unread = batches[0]  # read in this thread, after the guess is started: saves a handoff
        all_fit = len(held) == len(experts)  # in waves a guess would take their slots
        try:
            if before_wait is not None and all_fit:
                before_wait()
                t0 = time.perf_counter()
            mine, unread = unread, []  # from here a failed read drops them itself (_fill)
            self._fill(mine, False)
            for f in futures + waits:
                f.result()
        except BaseException:
            self._abandon(layer, held, unread, futures + waits)
            raise
        wait = time.perf_counter() - t0 if reads or waits else 0.0
        with self.lock:
            self._stats(layer).wait_s += wait
            return self._used(layer, held)

    def _hold_resident(self, layer: int, experts: list[int]) -> dict[int, int] | None:
        """The common step, every expert here and none arriving nor any guess queued, held and counted in one
        pass: {expert: slot}; else None, for _reserve. A decoded token takes this path at each layer, inside its
        step graph where the other threads wait (benchmarks/real_scale.md). Holds the lock."""
        keys = [(layer, e) for e in experts]
        slot, loading = self.res.slot, self.loading
        if self.queued or not all(k in slot and k not in loading for k in keys):
            return None
        self._hold_hits(keys, self._stats(layer))
        return self._used(layer, experts)

    def found(self, layer: int, experts: list[int]) -> None:
        """A decoded token's layer step whose experts its graph found in `tables` (ggml_step.decode_step_paged),
        after the fact: counted and shown to the policy as acquire's hits are. No hold was needed: under
        `stepping` nothing could evict them before their products ran."""
        with self.lock:
            self._count_hits([(layer, e) for e in experts], self._stats(layer))
            self._used(layer, experts)

    def _unlisted(self, key: Key) -> None:
        self.tables[key[0]][key[1]] = -1  # evicted: a graph that looks it up asks the host

    def _hold_hits(self, keys: list[Key], st: CacheStats) -> None:
        """Resident (or arriving) experts held for their step and counted. Holds the lock."""
        self.res.hold_many(keys)
        self._count_hits(keys, st)

    def _count_hits(self, keys: list[Key], st: CacheStats) -> None:
        """A prefetch hit where a guess brought one and this is its first use, else a hit. Holds the lock."""
        prefetched, loading = self.prefetched, self.loading
        for key in keys:
            if key in prefetched or key in loading:
                st.prefetch_hits += 1
                prefetched.discard(key)
            else:
                st.hits += 1

    def _used(self, layer: int, held: list[int]) -> dict[int, int]:
        """The end of a step's acquire: its experts counted as used -> {expert: slot}. Holds the lock."""
        self.res.used_step(layer, held)
        uses, slot = self.uses, self.res.slot
        for e in held:
            uses[(layer, e)] = uses.get((layer, e), 0) + 1
        return {e: slot[(layer, e)] for e in held}

    def _abandon(self, layer: int, held: list[int], unread: list[tuple[Key, int]], futures: list) -> None:
        """The step failed: let its other reads land, then let go of what the step still holds, so no expert
        stays in use (failed reads have left the cache already, see _drop_failed; so do the unread ones)."""
        for f in futures:
            f.exception()
        with self.lock:
            self._drop_failed(unread)
            for e in held:
                key = (layer, e)
                if key in self.res.in_use and key in self.res.slot:
                    self.res.drop(key)

    def _reserve(self, layer: int, experts: list[int]):
        held, reads, waits = set(), [], []
        with self.lock:
            st = self._stats(layer)
            wanted = set(experts)
            for key in [k for k in self.queued if k[0] == layer]:  # guesses for this layer not read yet
                del self.queued[key]
                if key[1] in wanted:
                    # a right guess: read it now beside the misses instead of waiting in line; the guess's
                    # hold on it becomes this step's
                    self.loading[key] = _DONE
                    self.res.unranked.pop(key, None)
                    held.add(key[1])
                    reads.append((key, self.res.slot[key]))
                    st.misses += 1
                else:  # a wrong one: never read, its slot goes back
                    del self.loading[key]
                    self.res.drop(key)
                    self.res.release(key)
                    st.prefetch_cancelled += 1
            for e in experts:  # protect what is already here before claiming anything
                key = (layer, e)
                if key in self.res.slot and e not in held:
                    self._hold_hits([key], st)
                    held.add(e)
                    if key in self.loading:
                        waits.append(self.loading[key])
            misses = [(layer, e) for e in experts if (layer, e) not in self.res.slot]
            for key, slot in self._claim(misses):
                self.res.hold(key)
                held.add(key[1])
                reads.append((key, slot))
                self.loading[key] = _DONE
                st.misses += 1
        return sorted(held), sorted(reads), list({id(f): f for f in waits}.values())

    def release_held(self, layer: int, experts: Iterable[int]) -> None:
        """End of a layer step (or wave): the experts may be evicted again."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        with self.lock:
            self._let_go(layer, experts, event)

    def _let_go(self, layer: int, experts: Iterable[int], event=None) -> None:
        keys = [(layer, e) for e in experts]
        self.res.drop_many(keys)
        for key in keys if event is not None else ():
            self.reads.slot_events[self.res.slot[key]] = event

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Start background reads of guessed experts. A guess takes a free slot, a stale guess's slot, or the
        policy's victim, never an expert in use, pinned or of `layer` itself. Returns reads started.

        The guesses are read in up to PREFETCH_BATCHES batches by PREFETCH_THREADS threads: the first land
        after a fraction of the reads, and a guess still queued when its layer runs is cancelled if wrong,
        or read at once with the misses if right (see _reserve)."""
        with self.stepping, self.lock:
            keys = [(layer, e) for e in experts if (layer, e) not in self.res.slot]
            claimed = self._claim(keys, may_evict=lambda k: k[0] != layer)
            for key, _ in claimed:
                self.res.hold(key)
                self.res.unranked[key] = None
            for batch in _split(claimed, PREFETCH_BATCHES):
                ticket = object()
                future = self.prefetch_pool.submit(self._prefetch, batch, ticket)
                for key, _ in batch:
                    self.loading[key], self.queued[key] = future, ticket
        return len(claimed)

    def _prefetch(self, batch: list[tuple[Key, int]], ticket: object) -> None:
        # the keys a layer step took over or cancelled meanwhile are not read here; nor are those cancelled and
        # guessed again since: a newer batch owns them now, with another slot (this batch's slot may belong to
        # another expert already)
        with self.lock:
            batch = [(key, slot) for key, slot in batch if self.queued.get(key) is ticket]
            for key, _ in batch:
                del self.queued[key]
        self._fill(batch, True)

    def fill(self, keys: list[Key], progress=None) -> int:
        """Read keys (not resident) into free slots now, FILL_BATCH at a time (neighbours in the file share reads),
        as guesses: never used yet, they are the first to go when a step needs a slot. progress(n): n more read.
        Returns how many were read."""
        with self.stepping, self.lock:
            claimed = self._claim([k for k in keys if k not in self.res.slot][: len(self.res.free)])
            for key, _ in claimed:
                self.res.hold(key)
                self.res.unranked[key] = None
                self.loading[key] = _DONE
        for i in range(0, len(claimed), FILL_BATCH):
            batch = claimed[i : i + FILL_BATCH]
            self._fill(batch, True)
            if progress is not None:
                progress(len(batch))
        return len(claimed)

    # -------------------------------------------------------------------------------- explicit residency

    def load(self, layer: int, expert: int) -> None:
        """Make an expert resident now (it may be evicted later, unless pinned)."""
        self.acquire(layer, [expert])
        self.release_held(layer, [expert])

    def release(self, layer: int, expert: int) -> None:
        """Drop an expert from the cache now (unpinning it). Experts in use cannot be released."""
        key = (layer, expert)
        self._wait_for(key)
        with self.stepping, self.lock:
            if key not in self.res.slot:
                return
            if key in self.res.in_use:
                raise MoepagerError(f"expert {expert} of layer {layer} is in use and cannot be released now")
            self.res.pinned.discard(key)
            self.prefetched.discard(key)
            self.res.release(key)

    def pin(self, layer: int, expert: int) -> None:
        """Load an expert and never evict it. At least top_k slots stay unpinned, for the other experts."""
        key = (layer, expert)
        if key not in set(self.source.expert_keys()):
            raise MoepagerError(
                f"cannot pin expert {expert} of layer {layer}: the model has no such routed expert"
            )
        with self.lock:
            if key not in self.res.pinned and len(self.res.pinned) + 1 + self.min_slots > self.capacity:
                raise MoepagerError(
                    f"cannot pin expert {expert} of layer {layer}: with {len(self.res.pinned)} pinned already, the "
                    f"cache of {self.capacity} slots would not keep the {self.min_slots} a layer needs free; "
                    f"raise the expert memory or pin fewer"
                )
        self.load(layer, expert)
        with self.lock:
            self.res.pinned.add(key)

    def unpin(self, layer: int, expert: int) -> None:
        with self.lock:
            self.res.pinned.discard((layer, expert))

    def resident(self) -> list[Key]:
        """(layer, expert) of every expert in the cache (arrived or arriving), sorted."""
        with self.lock:
            return sorted(self.res.slot)

    def pinned(self) -> list[Key]:
        with self.lock:
            return sorted(self.res.pinned)

    def guesses(self) -> tuple[set[Key], int]:
        """(experts a guess read, fill or prefetch, that no step has used yet; free slots)."""
        with self.lock:
            return set(self.res.unranked), len(self.res.free)

    def forget_guesses(self, keys: Iterable[Key]) -> None:
        """Drop those of keys still unused guesses, neither held nor arriving: their slots go back to the free list."""
        with self.stepping, self.lock:
            for key in keys:
                if key in self.res.unranked and self.res.evictable(key) and key not in self.loading:
                    self.prefetched.discard(key)
                    self.res.release(key)

    def _wait_for(self, key: Key) -> None:
        with self.lock:
            f = self.loading.get(key)
        if f is not None:
            f.exception()

    # -------------------------------------------------------------------------------- hot sets and stats

    def stats(self) -> dict:
        with self.lock:
            return summary(self)

    def activity(self) -> dict:
        with self.lock:
            return activity(self)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.prefetch_pool.shutdown(wait=True)


_DONE = Future()  # stands in the loading table for a demand read: the reading thread itself waits on it
_DONE.set_result(None)
# A layer's guesses go in PREFETCH_BATCHES batches read by PREFETCH_THREADS threads: two requests in flight
# is what this disk needs for full speed with sub-MiB spans (1 thread of 164 KiB reads: 0.74 GB/s, 2: 1.1),
# and with four batches half of a layer's guesses are still queued, so cancellable, while the rest read.
PREFETCH_BATCHES = 4
# a fill's experts per read call: ~1.5 MiB reads (as fast as larger ones, MACHINE.md), staging of a prefill step's size
FILL_BATCH = 16
PREFETCH_THREADS = 2


def _split(items: list, n: int) -> list[list]:
    """items (sorted) in at most n contiguous batches of near-equal length, so neighbours stay together."""
    n = min(n, len(items))
    if n <= 0:
        return []
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out
