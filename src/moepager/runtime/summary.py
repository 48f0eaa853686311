"""One line that sums up a generation: speed, the expert cache's true hit rate, disk bytes per token, memory.

`run` prints it on stderr after every generation and `chat` on /stats. The numbers come from engine.stats();
the disk bytes per decoded token are counted by DecodeReads, apart from the prefill's reads.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..system.sizes import format_bytes


class DecodeReads:
    """Expert bytes read while decoding, apart from the prefill (which reads most experts once and would hide
    the per-token cost). Wrap a token stream with `count`; the first token marks the end of the prefill."""

    def __init__(self, engine):
        self.engine, self.bytes, self.tokens = engine, 0, 0

    def _read(self) -> int:
        return self.engine.experts.stats()["bytes_read"] if hasattr(self.engine.experts, "stats") else 0

    def count(self, tokens: Iterator[int]) -> Iterator[int]:
        start, n = None, 0
        for tid in tokens:
            if start is None:
                start = self._read()
            n += 1
            yield tid
        if start is not None:  # the stream ended: every decode step after the first token has run
            self.bytes += self._read() - start
            self.tokens += n - 1


def summary_line(stats: dict, reads: DecodeReads | None = None) -> str:
    """'decode 31.2 tok/s, prefill 14.0 tok/s; experts: hit rate 0.23, prefetch hits 0.41, misses 0.36,
    2.1 MiB read per decoded token; peak memory 998.1 MiB'."""
    line = (
        f"decode {stats['decode_tokens_per_s']:.1f} tok/s, prefill {stats['prefill_tokens_per_s']:.1f} tok/s"
    )
    x = stats.get("experts")
    if x and "distributed" in x:  # experts on Ray actors: what the distribution cost
        w = x["distributed"]
        line += (
            f"; experts on {len(x['actors'])} Ray actors: {w['calls']} round trips, "
            f"{format_bytes(w['bytes_sent'])} sent, {format_bytes(w['bytes_received'])} received, "
            f"{format_bytes(x['bytes_read'])} read"
        )
    elif x:
        used = x["hits"] + x["prefetch_hits"] + x["misses"]
        share = lambda n: n / used if used else 0.0  # noqa: E731
        line += (
            f"; experts: hit rate {x['hit_rate']:.2f}, prefetch hits {share(x['prefetch_hits']):.2f}, "
            f"misses {share(x['misses']):.2f}"
        )
        if reads is not None and reads.tokens:
            line += f", {reads.bytes / reads.tokens / 2**20:.2f} MiB read per decoded token"
        else:
            line += f", {format_bytes(x['bytes_read'])} read"
    else:
        line += "; experts all resident"
    sp = stats.get("speculation")
    if sp:
        line += (f"; {sp['draft']} drafts: {sp['accepted']} of {sp['drafted']} accepted "
                 f"({sp['acceptance_rate']:.2f}), {sp['tokens_per_round']:.2f} tokens per forward, "
                 f"{sp['expert_reads_per_token']:.2f} expert reads per token")  # fmt: skip
    if stats.get("gguf_kernels"):
        line += f"; GGUF blocks by {stats['gguf_kernels']}"
    line += f"; peak memory {format_bytes(stats['peak_memory_bytes'])}"
    if stats.get("rss_before_weights_bytes") and stats.get("rss_after_first_token_bytes"):
        line += (f" (runtime {format_bytes(stats['rss_before_weights_bytes'])} before weights, "
                 f"{format_bytes(stats['rss_after_first_token_bytes'])} after the first token)")  # fmt: skip
    return line
