"""How many threads ggml's products use, chosen by the throughput they measure, not fixed at start.

ggml's threads meet at a spinning barrier inside every product. On a machine whose cores are shared with other
busy processes, a barrier waits for whichever of its threads the scheduler took away, a whole time slice, and a
decoded token is ~50 products: the resident Q4_0 qwen3-64x4 file decoded at 151 tok/s on 2 quiet cores and 28
beside two busy processes, where the measured choice kept 63 (benchmarks/README.md section 4). No count is right
on both machines, and a machine changes while a server runs, so the count is measured: weight bytes per second
of product time over short windows at the current count, with a window at the other count now and then.

Products compute each output from the same operands whatever the count (ggml splits work by output rows), so
the choice changes speed only, never a result.
"""

from __future__ import annotations

WINDOW_S = 0.05  # product seconds per measurement: a few tokens of a small model, part of one of a large one
# windows between two probes of the other count: rarely one thread where all cores are faster (a window in 40
# at half speed), more often all cores where one thread is faster (the machine may have quietened)
PROBE_ONE, PROBE_ALL = 40, 8
# a probe's window, as a share of a window: a decode step computed as one graph is one product, a whole token,
# so a full window at one thread on a quiet machine was ~12 tokens of a small model at half speed
PROBE_SHARE = 0.25
# how much faster one thread must measure to be chosen over all cores: a window of a shared VM's noise must not
# flip it (beside busy processes one thread measures 3-6x faster)
MARGIN = 1.25


class ThreadChoice:
    """The thread count for one calling thread's large products: `cores` or 1, whichever moves more weight
    bytes per second (each count's speed averaged over its latest windows; one thread only by a MARGIN).
    Probes the other count for one shorter window now and then (and first of all, to know it)."""

    def __init__(
        self, cores: int, window_s: float = WINDOW_S, probes: tuple[int, int] = (PROBE_ONE, PROBE_ALL)
    ):
        self.cores, self.window_s, self.probes = cores, window_s, probes
        self.current = cores
        self.rate: dict[int, float] = {}  # count -> bytes per second, its latest windows averaged
        self.windows = 0
        self.probing = False  # whether the current window is a probe
        self._bytes = self._seconds = 0.0

    def record(self, threads: int, nbytes: int, seconds: float) -> None:
        """One product of `nbytes` of weights took `seconds` on `threads` threads."""
        if threads != self.current or self.cores == 1:  # computed before the count changed; nothing to choose
            return
        self._bytes += nbytes
        self._seconds += seconds
        if self._seconds < self.window_s * (PROBE_SHARE if self.probing else 1.0):
            return
        rate = self._bytes / self._seconds
        old = self.rate.get(self.current)
        self.rate[self.current] = rate if old is None else (old + rate) / 2
        self._bytes = self._seconds = 0.0
        self.windows += 1
        other = 1 if self.current == self.cores else self.cores
        self.probing = other not in self.rate or self.windows % self.probes[other == self.cores] == 0
        if self.probing:
            self.current = other
        else:
            self.current = 1 if self.rate[1] > MARGIN * self.rate[self.cores] else self.cores
