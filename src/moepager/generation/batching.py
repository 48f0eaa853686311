"""Continuous batching: one worker thread owns the model and decodes every live sequence together.

Owns: the queue of new sequences, prefill, the batched decode step (Transformer.decode_batch), sampling,
token-level stopping (stop ids, max_tokens) and freeing a sequence's KV cache when it ends or is cancelled.
Does not own: text, stop strings, HTTP. Callers submit a Sequence and read its events through `on_event`,
which is called on the worker thread and must not block.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..model.layers import KVCache
from .generate import SamplingParams, prefill, sample
from .sampling import LogitsProcessor, prompt_logprobs

if TYPE_CHECKING:  # a type only: generation sits below the engine that builds it
    from ..runtime.engine import Engine

log = logging.getLogger("moepager.serving.server")

# Events a sequence receives: ("token", id), ("done", "stop" | "length" | "cancelled"), ("error", message),
# and first, when asked for, ("prompt_logprobs", [TokenLogprob per prompt token after the first]).
Event = tuple[str, object]


@dataclass
class Sequence:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    on_event: Callable[[Event], None]
    processor: LogitsProcessor | None = None  # penalties, bias, a grammar, logprobs: None costs nothing
    prompt_logprobs: int | None = None  # top alternatives per prompt token; None = no prompt logprobs
    cancelled: bool = (
        False  # set by the caller from any thread; the worker drops the sequence at its next step
    )
    # worker-side state
    cache: KVCache | None = None
    last: torch.Tensor | None = None  # the latest sampled token, [1]
    generator: torch.Generator | None = None
    produced: int = 0
    history: list[int] = field(default_factory=list)  # prompt and tokens so far (drafts look them up)
    finished: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None  # when its first token was sampled (time to first token)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class BatchStats:
    """Counters read by /metrics; written only by the worker thread."""

    steps: int = 0  # batched decode steps
    step_sequences: int = 0  # sum of batch sizes over steps (mean batch = step_sequences / steps)
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    active: int = 0
    waiting: int = 0
    first_tokens: int = 0  # sequences that sampled their first token
    first_token_s: float = 0.0  # their times to first token, summed (from submit)
    last_first_token_s: float | None = None  # the latest sequence's time to first token


class Scheduler:
    """Admits new sequences at token boundaries; each step runs the whole batch through one forward."""

    def __init__(self, engine: Engine, max_batch: int = 32):
        self.engine, self.max_batch = engine, max_batch
        self.stats = BatchStats()
        # what a live view lists: the running batch, and the sequence being prefilled (worker-side, read only)
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None
        self._inbox: queue.Queue[Sequence] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moepager-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(seq)
        self.stats.waiting = self._inbox.qsize()

    def sequences(self) -> tuple[list[Sequence], Sequence | None, list[Sequence]]:
        """(waiting, being prefilled, running), copied now; callable from any thread."""
        with self._inbox.mutex:
            waiting = list(self._inbox.queue)
        return waiting, self.prefilling, list(self.running)

    # --------------------------------------------------------------------------------- worker thread

    def _run(self) -> None:
        active: list[Sequence] = []
        while not self._stop.is_set():
            try:
                self._admit(active)
                active = [s for s in active if not self._dropped(s)]
                if active:
                    self._step(active)
                    active = [s for s in active if not self._dropped(s)]
            except Exception as e:  # a failed forward ends the sequences in it, never the worker
                log.exception("decode step failed")
                for s in active:
                    self._finish(s, ("error", f"{type(e).__name__}: {e}"))
                active = []
            self.stats.active = len(active)
            self.running = active

    def _admit(self, active: list[Sequence]) -> None:
        """Prefill waiting sequences (blocking briefly when idle) and add them to the batch."""
        while len(active) < self.max_batch:
            try:
                seq = self._inbox.get(timeout=0.05) if not active else self._inbox.get_nowait()
            except queue.Empty:
                break
            self.stats.waiting = self._inbox.qsize()
            if seq.cancelled:
                self._finish(seq, ("done", "cancelled"))
                continue
            self.prefilling = seq
            try:
                self._prefill(seq)
            except Exception as e:
                log.exception("prefill failed")
                self._finish(seq, ("error", f"{type(e).__name__}: {e}"))
                continue
            finally:
                self.prefilling = None
            if not self._dropped(seq):
                active.append(seq)

    @torch.inference_mode()
    def _prefill(self, seq: Sequence) -> None:
        model, device = self.engine.model, self.engine.device
        # the engine makes the KV cache it is configured for (e.g. one that spills to disk) when it can
        seq.cache = (
            self.engine.new_cache() if hasattr(self.engine, "new_cache") else KVCache(model.config.num_layers)
        )
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
        seq.history = list(seq.prompt)
        t0 = time.perf_counter()
        prompt = torch.tensor(seq.prompt, dtype=torch.long, device=device)
        whole = seq.prompt_logprobs is not None  # every position's logits, not only the last
        # in the engine's chunks, as a stream prefills: a memory limit plans the activations of one
        chunk = self.engine.kv.prefill_chunk if hasattr(self.engine, "kv") else len(seq.prompt)
        if whole:
            parts = [model(prompt[None, i : i + chunk], seq.cache, last_only=False)[0]
                     for i in range(0, len(seq.prompt), chunk)]  # fmt: skip
            logits = torch.cat(parts)  # [T, V]
        else:
            logits = prefill(model, prompt, seq.cache, chunk)  # [1, V]
        if whole:
            seq.on_event(
                ("prompt_logprobs", prompt_logprobs(logits[:-1], seq.prompt[1:], seq.prompt_logprobs))
            )
        logits = logits[-1:]  # [1, V]
        dt = time.perf_counter() - t0
        self.stats.prefill_tokens += len(seq.prompt)
        self.stats.prefill_s += dt
        self.engine.timings.prefill_tokens += len(seq.prompt)
        self.engine.timings.prefill_s += dt
        if seq.max_tokens == 0:  # only the prompt was asked for (its logprobs)
            self._finish(seq, ("done", "length"))
            return
        self._emit(seq, self._sample(seq, logits))

    @torch.inference_mode()
    def _step(self, active: list[Sequence]) -> None:
        speculation = getattr(self.engine, "speculation", None)
        # drafts are verified for a sequence alone: with more, one batched step already shares the reads
        if speculation is not None and len(active) == 1 and active[0].processor is None:
            return self._speculative_step(active[0], speculation)
        t0 = time.perf_counter()
        tokens = torch.cat([s.last for s in active])  # [B]
        logits = self.engine.model.decode_batch(tokens, [s.cache for s in active])  # [B, V]
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.step_sequences += len(active)
        self.stats.decode_tokens += len(active)
        self.stats.decode_s += dt
        self.engine.timings.decode_tokens += len(active)
        self.engine.timings.decode_s += dt
        for i, s in enumerate(active):
            try:
                token = self._sample(s, logits[i : i + 1])
            except Exception as e:  # one request's processor failing ends that request only
                log.exception("sampling failed")
                self._finish(s, ("error", f"{type(e).__name__}: {e}"))
                continue
            self._emit(s, token)

    def _speculative_step(self, seq: Sequence, speculation) -> None:
        """Draft, verify in one forward, and emit the 1..k+1 tokens it yields (generation/speculate.py)."""
        t0 = time.perf_counter()
        room = seq.max_tokens - seq.produced
        out = speculation.round(self.engine.model, seq.cache, seq.history, seq.params, seq.generator, room)
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.step_sequences += 1
        self.stats.decode_tokens += len(out)
        self.stats.decode_s += dt
        self.engine.timings.decode_tokens += len(out)
        self.engine.timings.decode_s += dt
        for tid in out:
            self._emit(seq, torch.tensor([tid], device=self.engine.device))
            if seq.finished:  # a stop id inside the drafts: the rest is dropped with the cache
                break

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] -> token [1], through the sequence's own processor when it has one."""
        if seq.processor is None:
            return sample(logits, seq.params, seq.generator)
        token = sample(seq.processor.process(logits), seq.params, seq.generator)
        seq.processor.accept(int(token))
        return token

    def _emit(self, seq: Sequence, token: torch.Tensor) -> None:
        seq.last = token.view(1)
        seq.produced += 1
        if seq.produced == 1:
            seq.first_token_at = time.perf_counter()
            ttft = seq.first_token_at - seq.submitted_at
            self.stats.first_tokens += 1
            self.stats.first_token_s += ttft
            self.stats.last_first_token_s = ttft
        tid = int(token)
        seq.history.append(tid)
        seq.on_event(("token", tid))
        if tid in seq.params.stop_ids or (seq.processor is not None and seq.processor.finished):
            self._finish(seq, ("done", "stop"))  # a stop id, or a grammar that is complete
        elif seq.produced >= seq.max_tokens:
            self._finish(seq, ("done", "length"))

    def _dropped(self, seq: Sequence) -> bool:
        """True once the sequence has ended; a cancelled one is ended here and its cache freed."""
        if seq.cancelled and not seq.finished:
            self._finish(seq, ("done", "cancelled"))
        return seq.finished

    def _finish(self, seq: Sequence, event: Event) -> None:
        if seq.finished:
            return
        if hasattr(seq.cache, "close"):  # a cache that spilled to disk removes its file
            seq.cache.close()
        seq.finished, seq.cache, seq.last = True, None, None  # drops the KV cache
        seq.on_event(event)
