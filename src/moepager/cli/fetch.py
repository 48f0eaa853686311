"""`moepager fetch`: fill the local store of a hub model ahead of time (what `run --remote` fills as it goes).

`all` fetches every expert; `hot` fetches the experts of a hot set file, or else the experts a calibration
text routes to, found by running the model over it (so they are fetched as any run would fetch them).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import MoepagerError
from ..sources.hub import RemoteSource
from ..system.sizes import format_bytes

WINDOW = 64  # calibration tokens per forward pass


def fetch(model: str, experts: str = "all", root: str | Path | None = None, revision: str | None = None,
          disk_budget: str | None = None, hot_set: str | None = None, text: str | None = None, tokens: int = 512,
          verify: bool = False, progress: bool = True) -> str:  # fmt: skip
    """Fetch into the local store; returns a one-line summary."""
    t0 = time.perf_counter()
    source = RemoteSource(model, root, revision, disk_budget, progress=progress)
    problems = []
    if verify:
        problems = source.verify(repair=True)
    if experts == "all":
        source.fetch(source.expert_keys(), progress)
    elif hot_set is not None:
        from ..paging.hot_set import load_hot_set

        source.fetch(sorted(load_hot_set(hot_set, source.config)), progress)
    else:
        _route_calibration(source, text, tokens, progress)
    s = source.tier_stats()
    remote, local = s["remote"], s["local"]
    line = (f"{local['path']}: {local['experts_stored']} of {local['experts_total']} experts stored "
            f"({format_bytes(local['stored_bytes'])} of {format_bytes(local['total_expert_bytes'])}); fetched "
            f"{format_bytes(remote['bytes_fetched'])} in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    if verify:
        line += (
            f"; verify: {len(problems)} bad expert(s) dropped to be fetched again"
            if problems
            else "; verified"
        )
    return line


def _route_calibration(source: RemoteSource, text: str | None, tokens: int, progress: bool) -> None:
    from .. import load

    engine = load(source, expert_memory="100%", prefetch=False)
    if engine.tokenizer is None:
        raise MoepagerError(f"{source.repo} has no tokenizer; give --hot-set FILE for --experts hot")
    if text is None:
        from importlib.resources import files

        body = files("moepager.data").joinpath("eval_gpl3.txt").read_text()
    else:
        try:
            body = Path(text).read_text(errors="replace")
        except FileNotFoundError:
            raise MoepagerError(f"no such calibration text file: {text}") from None
    ids = engine.tokenizer.encode(body)[:tokens]
    if not ids:
        raise MoepagerError("the calibration text is empty")
    windows = range(0, len(ids), WINDOW)
    if progress:
        from ..system.progress import progress_bar

        windows = progress_bar(windows, desc="routing calibration text", unit="window", leave=False)
    for start in windows:
        engine.logits(ids[start : start + WINDOW])
