"""`moepager verify`: check a store's checksums and, given its source checkpoint, every tensor bit for bit.

Owns the checks and the report (a list of problems, empty when the store is good); the CLI prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CorruptFile
from .store_source import StoreSource


@dataclass
class Report:
    store: Path
    experts_checked: int = 0
    experts_compared: int = 0
    dense_compared: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def verify(store: str | Path, source: str | Path | None = None, progress: bool = True) -> Report:
    """Every expert's crc32 and the dense file's; with `source`, every expert and dense tensor compared."""
    from tqdm import tqdm

    from .checkpoint import Checkpoint

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
            elif not _same_bits(ref[name], dense[name]):
                report.problems.append(f"dense tensor {name!r} differs from the source")
            report.dense_compared += 1
    for layer, e in tqdm(st.expert_keys(), desc="verify", unit="expert", disable=not progress):
        try:
            got = st.read_expert(layer, e) if src is not None else st.read_raw(layer, e)
        except CorruptFile as err:
            report.problems.append(str(err))
            continue
        report.experts_checked += 1
        if src is not None and (layer, e) in src.experts:
            want = src.read_expert(layer, e)
            names = sorted(set(got) | set(want))
            bad = [n for n in names if n not in got or n not in want or not _same_bits(got[n], want[n])]
            if bad:
                report.problems.append(
                    f"expert {e} of layer {layer}: {', '.join(bad)} differ from the source"
                )
            report.experts_compared += 1
    report.bytes_read = st.reader.stats()["bytes_read"] + (src.reader.stats()["bytes_read"] if src else 0)
    return report


def format_report(r: Report) -> str:
    lines = [f"{r.store}: {r.experts_checked} experts with a good checksum, {len(r.problems)} problem(s)"]
    if r.experts_compared or r.dense_compared:
        lines.append(
            f"compared with the source bit for bit: {r.experts_compared} experts, {r.dense_compared} dense tensors"
        )
    lines += [f"PROBLEM: {p}" for p in r.problems[:50]]
    if len(r.problems) > 50:
        lines.append(f"... and {len(r.problems) - 50} more problems")
    lines.append("OK" if r.ok else f"FAILED: {len(r.problems)} problem(s)")
    return "\n".join(lines)
