"""`moepager verify`: check a store's checksums and, given its source checkpoint, every tensor bit for bit.

An edited store's checksums are checked for every kept generation (bytes that generations share, once);
the comparison with a source is of the current generation.

Owns the checks and the report (a list of problems, empty when the store is good); the CLI prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CorruptFile
from .reading import StoreSource


@dataclass
class Report:
    store: Path
    experts_checked: int = 0
    experts_compared: int = 0
    dense_compared: int = 0
    converted: bool = False  # the store holds experts in another dtype: compared after the same conversion
    generations: int = 1  # generations whose checksums were checked
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _as_stored(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A store converted with --dense-dtype/--experts-dtype holds floats cast by .to(): cast the same way."""
    return ref.to(dtype) if ref.is_floating_point() and dtype.is_floating_point else ref


def _expert_as_stored(want: dict, got: dict, encoding: str) -> dict:
    """The source expert as convert stores it: quantized with the store's encoding, or cast to its dtype."""
    if encoding != "plain":
        from .encoding import convert_expert

        return convert_expert(want, encoding)  # deterministic, so still compared bit for bit
    return {n: _as_stored(t, got[n].dtype) if n in got else t for n, t in want.items()}


def verify(store: str | Path, source: str | Path | None = None, progress: bool = True) -> Report:
    """Every expert's crc32 and the dense file's; with `source`, every expert and dense tensor compared."""
    from ..sources.checkpoint import Checkpoint
    from ..system.progress import progress_bar

    st = StoreSource(store, verify_checksums=True)  # a mismatch raises; caught below, so every one is listed
    report = Report(st.path)
    src = Checkpoint(source) if source is not None else None
    if src is not None:
        if src.raw_config != st.raw_config:
            report.problems.append(f"config.json of {src.path} differs from the one in the store's manifest")
        if src.expert_keys() != st.expert_keys():
            report.problems.append(f"the store holds {len(st.expert_keys())} experts, {src.path} has "
                                   f"{len(src.expert_keys())}")  # fmt: skip
    try:
        dense = st.dense_state_dict()
    except CorruptFile as e:
        report.problems.append(str(e))
        dense = None
    if src is not None and dense is not None:
        ref = src.dense_state_dict()
        for name in sorted(set(ref) | set(dense)):
            if name not in dense or name not in ref:
                report.problems.append(
                    f"dense tensor {name!r} is only in the {'source' if name in ref else 'store'}"
                )
            elif not _same_bits(_as_stored(ref[name], dense[name].dtype), dense[name]):
                report.problems.append(f"dense tensor {name!r} differs from the source")
            report.dense_compared += 1
    for layer, e in progress_bar(st.expert_keys(), desc="verify", unit="expert", enabled=progress):
        try:
            got = st.read_expert(layer, e) if src is not None else st.read_raw(layer, e)
        except CorruptFile as err:
            report.problems.append(str(err))
            continue
        report.experts_checked += 1
        if src is not None and (layer, e) in src.experts:
            raw = src.read_expert(layer, e)
            want = _expert_as_stored(raw, got, st.encoding(layer, e))
            report.converted |= any(want[n].dtype != raw[n].dtype for n in raw if n in want)
            names = sorted(set(got) | set(want))
            bad = [n for n in names if n not in got or n not in want or not _same_bits(got[n], want[n])]
            if bad:
                report.problems.append(
                    f"expert {e} of layer {layer}: {', '.join(bad)} differ from the source"
                )
            report.experts_compared += 1
    report.bytes_read = st.reader.stats()["bytes_read"] + (src.reader.stats()["bytes_read"] if src else 0)
    _verify_older_generations(st, report, progress)
    return report


def _verify_older_generations(current: StoreSource, report: Report, progress: bool) -> None:
    """Checksums of the kept generations other than the current one: experts and dense files not already
    checked (a generation mostly shares its bytes with the one before it)."""
    from ..errors import MoepagerError
    from ..system.progress import progress_bar

    seen = {(x.file, x.offset) for x in current.manifest.experts.values()}
    dense_seen = set(current.manifest.dense_files)
    for h in current.manifest.history:
        if h["id"] == current.manifest.generation:
            continue
        try:
            st = StoreSource(current.path, verify_checksums=True, generation=h["id"])
        except MoepagerError as e:
            report.problems.append(f"generation {h['id']}: {e}")
            continue
        report.generations += 1
        for name in st.manifest.dense_files:
            if name not in dense_seen:
                dense_seen.add(name)
                try:
                    st.dense_file(name)
                except CorruptFile as e:
                    report.problems.append(f"generation {h['id']}: {e}")
        keys = [k for k, x in st.manifest.experts.items() if (x.file, x.offset) not in seen]
        for layer, e in progress_bar(
            keys, desc=f"verify generation {h['id']}", unit="expert", enabled=progress
        ):
            x = st.manifest.experts[(layer, e)]
            seen.add((x.file, x.offset))
            try:
                st.read_raw(layer, e)
            except CorruptFile as err:
                report.problems.append(f"generation {h['id']}: {err}")
                continue
            report.experts_checked += 1
        report.bytes_read += st.reader.stats()["bytes_read"]


def format_report(r: Report) -> str:
    gens = f" over {r.generations} generations" if r.generations > 1 else ""
    lines = [
        f"{r.store}: {r.experts_checked} experts with a good checksum{gens}, {len(r.problems)} problem(s)"
    ]
    if r.experts_compared or r.dense_compared:
        how = " (the source converted to the store's dtypes first)" if r.converted else ""
        lines.append(
            f"compared with the source bit for bit{how}: {r.experts_compared} experts, "
            f"{r.dense_compared} dense tensors"
        )
    lines += [f"PROBLEM: {p}" for p in r.problems[:50]]
    if len(r.problems) > 50:
        lines.append(f"... and {len(r.problems) - 50} more problems")
    lines.append("OK" if r.ok else f"FAILED: {len(r.problems)} problem(s)")
    return "\n".join(lines)
