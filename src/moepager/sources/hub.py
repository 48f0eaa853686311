"""RemoteSource: a hub model run without downloading it whole (the ModelSource contract, with read_experts).

Tiers, each with its own stats: remote (the hub, by HTTP range: hub_ranges.py) -> local disk (a mirror
folder that fills progressively: local_tier.py, read by a Checkpoint over it with O_DIRECT) -> RAM (the
expert cache above, unchanged). Opening fetches config, tokenizer files, each .safetensors header and the
dense tensors (by range, using the header); an expert is fetched the first time a read asks for it, the
experts of one batch together (neighbours share one request), then committed to the mirror and read from it
as a local checkpoint would be. A later run, even offline, opens the mirror without the network and fetches
only experts it has not seen. The expert cache's prefetch reaches this tier as any read does.

The model never sees this module: it is a source like the others, built by the caller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..model.moe import ExpertWeights
from ..system.direct_reader import DirectReader
from ..system.durable import fsync_dir, write_atomic
from .checkpoint import Checkpoint
from .hub_ranges import HubRanges
from .local_tier import JOURNAL, MAGIC, STATE_DIR, LocalMirror, Piece, crc_of

# config and tokenizer files, fetched whole
SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
SPAN_MAX = 64 << 20  # neighbouring pieces are fetched by one request up to this size
FETCH_THREADS = 4  # requests in flight while `fetch` fills the store
Key = tuple[int, int]


def default_root() -> Path:
    """Where mirrors live unless told: beside huggingface_hub's own cache (HF_HOME)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "moepager"


class RemoteSource:
    """The model `repo` (ORG/NAME) at `revision`, its experts fetched on first use into a mirror under root."""

    # a miss may cost a network round trip: the expert cache guesses ahead even when every expert fits
    slow_misses = True

    def __init__(self, repo: str, root: str | Path | None = None, revision: str | None = None,
                 disk_budget: int | str | None = None, timeout: float = 30.0, tries: int = 5,
                 backoff: float = 0.5, progress: bool = True, reader: DirectReader | None = None):  # fmt: skip
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(repo)) or str(repo).startswith((".", "/")):
            raise MoepagerError(f"--remote needs a hub model id like ORG/NAME, got {repo!r}")
        self.repo = str(repo)
        self.hub = HubRanges(self.repo, revision, timeout, tries, backoff)
        self._files: list[str] | None = None  # the repository's files, when the hub was reached
        self.base = Path(root or default_root()).expanduser().absolute() / (
            "models--" + self.repo.replace("/", "--")
        )
        folder = self.base / "snapshots" / self._commit()
        if not (folder / STATE_DIR / JOURNAL).exists():
            self._set_up(folder, progress)
        self.local = Checkpoint(folder, reader=reader)
        self.path, self.config, self.raw_config = folder, self.local.config, self.local.raw_config
        pieces = {
            k: [Piece(p.file.name, p.offset, p.nbytes) for p in parts]
            for k, parts in self.local.experts.items()
        }
        self.mirror = LocalMirror.open(folder, pieces, _budget(disk_budget, pieces))
        self._lock = threading.Lock()
        self._inflight: dict[Key, Future] = {}
        self.counts = {"experts_fetched": 0, "expert_reads": 0, "expert_reads_local": 0, "fetch_wait_s": 0.0}
        if self.mirror.dense_crc is None:
            self._fetch_dense(progress)

    # -------------------------------------------------------------------------------- opening

    def _commit(self) -> str:
        """The commit to read: asked of the hub when it can be reached, else the one the last run used."""
        from huggingface_hub import constants

        ref = self.base / "refs" / self.hub.revision.replace("/", "--")
        if not constants.is_offline_mode():
            try:
                self._files = self.hub.resolve()
                ref.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(ref, self.hub.commit.encode())
                return self.hub.commit
            except MoepagerError as e:
                if not ref.exists():
                    raise
                warnings.warn(f"{e}; using the local store of {self.repo}", stacklevel=3)
        if not ref.exists():
            raise MoepagerError(
                f"{self.repo} has no local store in {self.base} and HF_HUB_OFFLINE is set; unset it to fetch it"
            )
        self.hub.commit = ref.read_text().strip()
        return self.hub.commit

    def _set_up(self, folder: Path, progress: bool) -> None:
        """The mirror's skeleton: side files whole, each weight file at full size holding only its header.
        Built beside `folder` and renamed into place, so a run killed midway leaves nothing half made."""
        if self._files is None:
            raise MoepagerError(f"{folder}: the local store of {self.repo} was never completed; connect to the "
                                f"hub (unset HF_HUB_OFFLINE) to fetch it")  # fmt: skip
        files = [f for f in self._files if "/" not in f]
        index = [f for f in files if f.endswith(".safetensors.index.json")]
        side = [f for f in files if f.endswith(SIDE_SUFFIXES)]
        if "config.json" not in side:
            raise MoepagerError(f"{self.repo}: no config.json in the repository; is it a transformers model?")
        tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)
        try:
            for name in side:
                (tmp / name).write_bytes(self.hub.read(name, 0, self.hub.size(name)))
            if index:
                try:
                    weights = sorted(set(json.loads((tmp / index[0]).read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, AttributeError) as e:
                    raise MoepagerError(
                        f"{self.repo}/{index[0]}: not a valid safetensors index ({e})"
                    ) from None
            else:
                weights = [f for f in files if f.endswith(".safetensors")]
            if not weights:
                raise MoepagerError(
                    f"{self.repo}: no .safetensors files in the repository; --remote needs them"
                )
            for name in weights:
                self._skeleton(tmp / name, name)
            (tmp / STATE_DIR / JOURNAL).write_text(MAGIC + "\n")
            for p in tmp.iterdir():
                if p.is_file():
                    with open(p, "rb+") as f:
                        os.fsync(f.fileno())
            fsync_dir(tmp)
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _skeleton(self, path: Path, name: str) -> None:
        size = self.hub.size(name)
        head = self.hub.read(name, 0, 8) if size >= 8 else b""
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise MoepagerError(
                f"{self.hub.url(name)}: not a safetensors file (header length {n}, size {size})"
            )
        with open(path, "wb") as f:
            f.write(head + self.hub.read(name, 8, n))
            f.truncate(size)  # the rest is a hole until fetched

    def _fetch_dense(self, progress: bool) -> None:
        pieces = sorted(Piece(i.file.name, i.offset, i.nbytes) for i in self.local.dense.values())
        bar = _bar(sum(p.nbytes for p in pieces), f"dense weights of {self.repo}", progress)
        try:
            crcs, error = self._fetch_pieces({"dense": pieces}, bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        if error is not None:
            raise error
        self.mirror.commit_dense(crcs["dense"])

    # -------------------------------------------------------------------------------- fetching

    def _fetch_pieces(self, groups: dict, on_bytes=None) -> tuple[dict, MoepagerError | None]:
        """Fetch each group's pieces into the mirror, neighbours in one request; crc32 of each group folded
        as its bytes pass (in (file, offset) order, as local_tier.crc_of reads them back). Returns the crcs
        of the groups fetched whole (written and synced) and the error that stopped the rest, if any."""
        items = sorted((p, g) for g, ps in groups.items() for p in ps)
        spans: list[list] = []
        for p, g in items:
            last = spans[-1] if spans else None
            if (
                last
                and last[0] == p.file
                and last[2] == p.offset
                and p.offset + p.nbytes - last[1] <= SPAN_MAX
            ):
                last[2] = p.offset + p.nbytes
                last[3].append((p, g))
            else:
                spans.append([p.file, p.offset, p.offset + p.nbytes, [(p, g)]])
        crcs = dict.fromkeys(groups, 0)
        failed, error = set(), None
        for file, start, end, inside in spans:
            at = [0]

            def sink(pos: int, data: memoryview, file=file, start=start, inside=inside, at=at) -> None:
                self.mirror.write(file, start + pos, data)
                a, b = start + pos, start + pos + len(data)
                while at[0] < len(inside) and inside[at[0]][0].offset + inside[at[0]][0].nbytes <= a:
                    at[0] += 1
                j = at[0]
                while j < len(inside) and inside[j][0].offset < b:
                    p, g = inside[j]
                    lo, hi = max(a, p.offset), min(b, p.offset + p.nbytes)
                    crcs[g] = zlib.crc32(data[lo - a : hi - a], crcs[g])
                    j += 1
                if on_bytes is not None:
                    on_bytes(len(data))

            if error is None:
                try:
                    self.hub.get(file, start, end - start, sink)
                    continue
                except MoepagerError as e:
                    error = e
                except OSError as e:  # writing the mirror: a full disk, most likely
                    error = MoepagerError(f"cannot write {self.path / file}: {e.strerror}; free some disk space "
                                          f"or give a smaller --disk-budget")  # fmt: skip
            failed.update(g for _, g in inside)
        done = [g for g in groups if g not in failed]
        self.mirror.sync([p for g in done for p in groups[g]])
        return {g: crcs[g] for g in done}, error

    def _ensure(self, keys: list[Key], on_bytes=None) -> None:
        """Make keys local and hold them (the caller releases): missing ones are fetched here, or waited
        for when another thread is fetching them already."""
        t0 = time.perf_counter()
        self.mirror.hold(keys)
        try:
            mine, theirs = [], []
            with self._lock:
                for k in keys:
                    if self.mirror.has(k):
                        continue
                    if k in self._inflight:
                        theirs.append(self._inflight[k])
                    else:
                        self._inflight[k] = Future()
                        mine.append(k)
            if mine:
                self._fetch_experts(mine, on_bytes)
            for f in theirs:
                f.result()
        except BaseException:
            self.mirror.release(keys, used=False)
            raise
        with self._lock:
            self.counts["expert_reads"] += len(keys)
            if mine or theirs:
                self.counts["fetch_wait_s"] += time.perf_counter() - t0
            self.counts["expert_reads_local"] += len(keys) - len(mine) - len(theirs)

    def _fetch_experts(self, keys: list[Key], on_bytes=None) -> None:
        crcs, error = {}, None
        try:
            self.mirror.make_room(sum(self.mirror.nbytes(k) for k in keys))
            crcs, error = self._fetch_pieces({k: self.mirror.pieces[k] for k in keys}, on_bytes)
            self.mirror.commit(crcs)
        except BaseException as e:
            error = error or e
            raise
        finally:
            with self._lock:
                self.counts["experts_fetched"] += len(crcs)
                for k in keys:
                    f = self._inflight.pop(k)
                    if k in crcs:
                        f.set_result(None)
                    else:
                        f.set_exception(
                            error or MoepagerError(f"expert {k[1]} of layer {k[0]} was not fetched")
                        )
        if error is not None:
            raise error

    def fetch(self, keys: list[Key], progress: bool = True) -> int:
        """Fill the local store with keys ahead of time (a progress bar over bytes); returns bytes fetched."""
        missing = [k for k in keys if not self.mirror.has(k)]
        need = sum(self.mirror.nbytes(k) for k in missing)
        budget = self.mirror.disk_budget
        if budget is not None and need > budget:
            raise MoepagerError(f"the experts asked for take {need / 2**30:.2f} GiB, above the disk budget of "
                                f"{budget / 2**30:.2f} GiB; raise --disk-budget or fetch --experts hot")  # fmt: skip
        batches, batch, size = [], [], 0
        for k in missing:  # sorted keys: a batch is neighbouring experts, fetched in a few large requests
            batch.append(k)
            size += self.mirror.nbytes(k)
            if size >= SPAN_MAX // 2:
                batches.append(batch)
                batch, size = [], 0
        batches += [batch] if batch else []
        bar = _bar(need, f"experts of {self.repo}", progress)

        def one(b: list[Key]) -> None:
            self._ensure(b, bar.update if bar else None)
            self.mirror.release(b, used=False)

        before = self.hub.stats.bytes_fetched
        try:
            with ThreadPoolExecutor(FETCH_THREADS) as pool:
                for f in [pool.submit(one, b) for b in batches]:
                    f.result()
        finally:
            if bar:
                bar.close()
        return self.hub.stats.bytes_fetched - before

    # -------------------------------------------------------------------------------- ModelSource

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        return self.local.dense_state_dict()

    def expert_keys(self) -> list[Key]:
        return self.local.expert_keys()

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.local.expert_nbytes(layer, expert)

    def read_expert(self, layer: int, expert: int, out: ExpertWeights | None = None) -> ExpertWeights:
        self._ensure([(layer, expert)])
        try:
            return self.local.read_expert(layer, expert, out)
        finally:
            self.mirror.release([(layer, expert)], used=True)

    def read_experts(self, keys: list[Key], outs: list[ExpertWeights], land=None) -> None:
        self._ensure(keys)
        try:
            self.local.read_experts(keys, outs, land)
        finally:
            self.mirror.release(keys, used=True)

    # -------------------------------------------------------------------------------- checks and stats

    def verify(self, repair: bool = False) -> list[str]:
        """Problems found by reading back every stored expert's (and the dense tensors') crc32; with repair,
        experts that fail are forgotten, to be fetched again."""
        problems, bad = [], []
        dense = sorted(Piece(i.file.name, i.offset, i.nbytes) for i in self.local.dense.values())
        if self.mirror.dense_crc is not None and crc_of(self.path, dense) != self.mirror.dense_crc:
            problems.append(f"{self.path}: dense tensors do not match their checksum; delete the folder")
        for key, crc in list(self.mirror.committed.items()):
            if crc_of(self.path, self.mirror.pieces[key]) != crc:
                problems.append(f"{self.path}: expert {key[1]} of layer {key[0]} does not match its checksum")
                bad.append(key)
        if repair and bad:
            self.mirror.forget(bad)
        return problems

    def tier_stats(self) -> dict:
        """The remote and local disk tiers' counters (the RAM tier's are the expert cache's)."""
        total = sum(self.mirror.nbytes(k) for k in self.mirror.pieces)
        with self._lock:
            remote = {**self.hub.stats.as_dict(), "experts_fetched": self.counts["experts_fetched"],
                      "wait_s": self.counts["fetch_wait_s"]}  # fmt: skip
            local = {"expert_reads": self.counts["expert_reads"], "from_local": self.counts["expert_reads_local"],
                     "experts_stored": len(self.mirror.committed), "experts_total": len(self.mirror.pieces),
                     "stored_bytes": self.mirror.stored_bytes(), "total_expert_bytes": total,
                     "disk_bytes": self.mirror.disk_usage(), "disk_budget": self.mirror.disk_budget,
                     "evictions": self.mirror.evictions, "bytes_read": self.local.reader.stats()["bytes_read"],
                     "path": str(self.path)}  # fmt: skip
        return {"remote": remote, "local": local}


def _budget(value: int | str | None, pieces: dict) -> int | None:
    if value is None:
        return None
    from ..system.sizes import parse_bytes

    total = sum(p.nbytes for ps in pieces.values() for p in ps)
    return parse_bytes(value, total, what="disk_budget")


def _bar(total: int, what: str, progress: bool):
    if not progress or total == 0:
        return None
    from ..system.progress import progress_bar

    return progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, leave=False)
