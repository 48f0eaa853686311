"""A store opened for writing: replace, add, disable and remove routed experts, and commit as a generation.

Owns edits and the generation history of a store (the format is format.py's). Edits are staged in memory
and written by `commit`, which never changes a byte an earlier generation reads, in this order, each step
fsynced before the next:
  1. the new experts -> experts.N.bin; the changed router tensors -> dense.N.safetensors
  2. the new manifest -> generations/N.json (a temporary name, then a rename)
  3. manifest.json replaced by a rename: the commit point
Killed before 3, the store opens at the old generation (the new files are unreferenced; the next writer
removes them); after it, at the new one. Readers never lock; writers take a lock file, one at a time.

An expert is "absent" when its router never picks it (its logit is -inf): removed (its bytes dropped),
disabled (kept), or padding in a layer that did not grow when another did (layers share one expert count,
E, as config.json states it). Reading is StoreSource's job.
"""

from __future__ import annotations

import copy
import fcntl
import os
import re
import zlib
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..model.moe import ExpertWeights
from ..system.durable import fsync_dir
from ..system.safetensors import DTYPES as ST_DTYPES
from ..system.safetensors import read_header, read_tensor
from .commit_files import (
    dead_experts,
    history_record,
    layout_like,
    pack_expert,
    punch_experts,
    write_dense,
    write_manifest_atomically,
)
from .convert import _ExpertsFile
from .encoding import convert_expert, expert_from_tensors, expert_tensors
from .format import (
    EDITED_VERSION,
    GENERATIONS,
    MANIFEST,
    ExpertEntry,
    Layout,
    Manifest,
    generation_path,
    read_manifest,
)  # fmt: skip
from .reading import StoreSource

LOCK = ".moepager-lock"
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # config.json names of E
ROUTER_PARTS = ("weight", "bias", "e_score_correction_bias")  # [E, D], [E] (GPT-OSS), [E] (DeepSeek-V3)
_COMMITTED = re.compile(r"(experts\.\d+\.bin|dense\.\d+\.safetensors)$")  # files a commit writes
_TEMP = re.compile(r".*\.tmp-\d+$")
ZERO = "zero"  # a staged expert that is all zeros (removed or padding): one copy per commit is written
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def router_name(layer: int, part: str) -> str:
    return f"layers.{layer}.ffn.router.{part}"


class EditableStore:
    """A store opened for writing (`moepager.store.open(path, writable=True)`); use it as a context manager or
    call close() to release the writer's lock. `source` reads the current generation."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        if not (self.path / MANIFEST).is_file():
            raise MoepagerError(
                f"{self.path} is not a moepager store (no {MANIFEST}); convert a checkpoint first"
            )
        try:
            self._lock = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MoepagerError(f"{self.path}: cannot open the store for writing ({e.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise MoepagerError(f"{self.path}: another process is editing this store; wait for it") from None
        try:
            self._load()
            self._remove_unreferenced()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        self.source = StoreSource(self.path)
        self.manifest: Manifest = self.source.manifest
        self.config = self.source.config
        self.num_experts = self.config.num_experts  # E, grown by add
        self._staged: dict[tuple[int, int], dict | str] = {}  # stored tensors, or ZERO
        self._absent = {layer: set(ids) for layer, ids in self.manifest.absent.items()}
        self._routers: dict[int, dict[str, torch.Tensor]] = {}  # router tensors read (and edited) per layer
        self._edited_routers: set[int] = set()
        self.changes: list[str] = []

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> EditableStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- reading

    @property
    def generation(self) -> int:
        return self.manifest.generation

    def moe_layers(self) -> list[int]:
        return [i for i, moe in enumerate(self.config.moe_layers) if moe]

    def absent(self, layer: int) -> set[int]:
        return set(self._absent.get(layer, ()))

    def experts(self, layer: int) -> list[int]:
        """The experts the layer's router can pick."""
        self._check_layer(layer)
        return [e for e in range(self.num_experts) if e not in self._absent.get(layer, ())]

    def read_expert(self, layer: int, expert: int) -> ExpertWeights:
        """The expert as staged or stored (quantized experts as codes and scales)."""
        self.check_expert(layer, expert, present=False)
        staged = self._staged.get((layer, expert))
        if staged is None:
            return self.source.read_expert(layer, expert)
        layout = self._layout(layer)
        if staged == ZERO:
            return {t.name: torch.zeros(t.shape, dtype=t.dtype) for t in layout.tensors}
        return expert_from_tensors({k: v.clone() for k, v in staged.items()}, layout.encoding)

    def router(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's router tensors as staged: weight [E, D], and bias / e_score_correction_bias [E] where
        the family has them. Edit them through set_router_row (they are copies)."""
        self._check_layer(layer)
        return {k: v.clone() for k, v in self._router(layer).items()}

    def _router(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._routers:
            self._routers[layer] = read_router(self.source, layer)
        return self._routers[layer]

    # ---------------------------------------------------------------------------------------- editing

    def replace(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        """Stage new weights for an expert (gate [I, D], up [I, D], down [D, I] and the family's biases)."""
        self.check_expert(layer, expert, present=True)
        self._staged[(layer, expert)] = self._stored(layer, weights)
        self.changes.append(f"replace {layer}:{expert}")

    def set_router_row(
        self, layer: int, expert: int, row: torch.Tensor, bias: float | None = None,
        correction_bias: float | None = None,
    ) -> None:  # fmt: skip
        """Stage the expert's router row [D] (and its router bias / score correction bias, where the family
        has them)."""
        self.check_expert(layer, expert, present=False)
        r = self._router(layer)
        if tuple(row.shape) != (r["weight"].shape[1],):
            raise MoepagerError(f"router row of {layer}:{expert}: shape {tuple(row.shape)}, the router needs "
                                f"({r['weight'].shape[1]},)")  # fmt: skip
        r["weight"][expert] = row.to(r["weight"].dtype)
        for part, value in (("bias", bias), ("e_score_correction_bias", correction_bias)):
            if value is not None:
                if part not in r:
                    raise MoepagerError(f"a {self.config.family} router has no {part}; leave it out")
                r[part][expert] = float(value)
        self._edited_routers.add(layer)
        self.changes.append(f"router {layer}:{expert}")

    def add(
        self, layer: int, weights: ExpertWeights, router_row: torch.Tensor, router_bias: float | None = None,
        correction_bias: float | None = None,
    ) -> int:  # fmt: skip
        """Stage a new expert of `layer` with its router row; return its id. It takes the layer's first
        padding id after its last expert, else E grows by one (other layers get an absent padding expert)."""
        self._check_routing(layer, "add an expert")
        stored = self._stored(layer, weights)
        present = self.experts(layer)
        expert = max(present) + 1
        if expert == self.num_experts:
            self._grow()
        self._absent[layer].discard(expert)
        self._staged[(layer, expert)] = stored
        r = self._router(layer)
        if "bias" in r and router_bias is None:
            router_bias = 0.0
        if "e_score_correction_bias" in r and correction_bias is None:
            correction_bias = 0.0
        self.set_router_row(layer, expert, router_row, router_bias, correction_bias)
        self.changes[-1] = f"add {layer}:{expert}"
        return expert

    def disable(self, layer: int, expert: int) -> None:
        """The router stops picking the expert; its bytes stay (enable brings it back)."""
        self._check_routing(layer, "disable an expert")
        self.check_expert(layer, expert, present=True)
        if len(self.experts(layer)) <= self.config.top_k:
            raise MoepagerError(f"layer {layer} has {len(self.experts(layer))} experts and routes to "
                                f"{self.config.top_k}; it cannot lose one")  # fmt: skip
        self._absent.setdefault(layer, set()).add(expert)
        self.changes.append(f"disable {layer}:{expert}")

    def enable(self, layer: int, expert: int) -> None:
        """Undo disable: the router may pick the expert again."""
        self.check_expert(layer, expert, present=False)
        if expert not in self._absent.get(layer, ()):
            raise MoepagerError(f"expert {expert} of layer {layer} is not disabled")
        if self._is_zero(layer, expert):
            raise MoepagerError(f"expert {expert} of layer {layer} was removed (or is padding): its weights are "
                                "gone; give it new ones with add")  # fmt: skip
        self._absent[layer].discard(expert)
        self.changes.append(f"enable {layer}:{expert}")

    def remove(self, layer: int, expert: int) -> None:
        """Disable the expert and drop its bytes from the generations to come."""
        self.disable(layer, expert)
        self._staged[(layer, expert)] = ZERO
        self.changes[-1] = f"remove {layer}:{expert}"

    def _grow(self) -> None:
        e = self.num_experts
        for layer in self.moe_layers():
            self._check_routing(layer, "add an expert")
            r = self._router(layer)
            r["weight"] = torch.cat([r["weight"], r["weight"].new_zeros(1, r["weight"].shape[1])])
            for part in ("bias", "e_score_correction_bias"):
                if part in r:
                    r[part] = torch.cat([r[part], r[part].new_zeros(1)])
            self._edited_routers.add(layer)
            self._absent.setdefault(layer, set()).add(e)
            self._staged[(layer, e)] = ZERO
        self.num_experts = e + 1

    # ---------------------------------------------------------------------------------------- checks

    def _check_layer(self, layer: int) -> None:
        if not (0 <= layer < self.config.num_layers and self.config.moe_layers[layer]):
            raise MoepagerError(f"layer {layer} is not a MoE layer of this model (MoE layers: "
                                f"{', '.join(map(str, self.moe_layers()))})")  # fmt: skip

    def check_expert(self, layer: int, expert: int, present: bool) -> None:
        """A MoE layer's expert id within E (with `present`: one its router picks), else a clear error."""
        self._check_layer(layer)
        if not 0 <= expert < self.num_experts:
            raise MoepagerError(f"layer {layer} has experts 0..{self.num_experts - 1}, not {expert}")
        if present and expert in self._absent.get(layer, ()):
            raise MoepagerError(f"expert {expert} of layer {layer} is removed or disabled")

    def _check_routing(self, layer: int, what: str) -> None:
        self._check_layer(layer)
        c = self.config
        if c.grouped_routing and c.n_group > 1:
            raise MoepagerError(f"cannot {what}: {c.family} routing picks experts in n_group={c.n_group} groups "
                                "of equal size, which one expert more or less would break")  # fmt: skip

    def _layout(self, layer: int) -> Layout:
        """The layout of the layer's experts (every expert of a layer has one)."""
        entry = self.manifest.experts[(layer, 0)]
        return self.manifest.layouts[entry.layout]

    def _is_zero(self, layer: int, expert: int) -> bool:
        if (layer, expert) in self._staged:
            return self._staged[(layer, expert)] == ZERO
        if (layer, expert) not in self.manifest.experts:
            return True
        view = self.source.read_raw(layer, expert)
        return not any(view)

    def _stored(self, layer: int, weights: ExpertWeights) -> dict[str, torch.Tensor]:
        """weights in the form the store keeps them: cast to its dtypes, or quantized with its encoding."""
        layout = self._layout(layer)
        want = {t.name: t for t in layout.tensors}
        if not all(isinstance(w, torch.Tensor) for w in weights.values()):
            raise MoepagerError("expert weights must be tensors")
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        if layout.encoding != "plain":  # quantized as convert would: lossy, as the store already is
            weights, _ = expert_tensors(convert_expert(weights, layout.encoding))
        else:
            weights = {k: v.to(want[k].dtype) if k in want else v for k, v in weights.items()}
        names = set(want)
        if set(weights) != names:
            raise MoepagerError(f"expert weights need exactly {sorted(names)}, got {sorted(weights)}")
        for name, t in want.items():
            if tuple(weights[name].shape) != t.shape:
                raise MoepagerError(f"expert weight {name!r} has shape {tuple(weights[name].shape)}; this "
                                    f"store's experts have {t.shape}")  # fmt: skip
        return weights

    @property
    def dirty(self) -> bool:
        return bool(self.changes)

    # ---------------------------------------------------------------------------------------- commit

    def commit(self, message: str = "") -> int:
        """Write the staged edits as a new generation and make it current; return its id."""
        if not self.dirty:
            raise MoepagerError(f"{self.path}: nothing to commit")
        old = self.manifest
        history = old.history or [history_record(old.generation, None, "as converted", stamp=False)]
        gid = max(h["id"] for h in history) + 1
        experts, layouts = dict(old.experts), dict(old.layouts)
        new_files: dict[str, dict] = {}
        if self._staged:
            name = f"experts.{gid}.bin"
            new_files[name] = {"size": self._write_experts(name, experts, layouts), "crc32": None}
        dense_files = old.dense_files
        if self._edited_routers:
            name = f"dense.{gid}.safetensors"
            new_files[name] = write_dense(self.path / name, self._router_tensors())
            dense_files = (*dense_files, name)
        referenced = {x.file for x in experts.values()} | set(dense_files)
        data = {x.file for x in old.experts.values()} | set(old.dense_files)
        files = {k: v for k, v in old.files.items() if k not in data or k in referenced}
        files.update(new_files)
        config = copy.deepcopy(old.config)
        for key in COUNT_KEYS:
            if isinstance(config.get(key), int):
                config[key] = self.num_experts
        absent = {layer: tuple(sorted(ids)) for layer, ids in sorted(self._absent.items()) if ids}
        new = Manifest(config, old.dtype, layouts, experts, files, old.source, EDITED_VERSION, gid, dense_files,
                       absent)  # fmt: skip
        (self.path / GENERATIONS).mkdir(exist_ok=True)
        if not old.history:  # a converted store: its manifest is kept as generation 0
            first = copy.copy(old)
            first.format_version, first.history = EDITED_VERSION, []
            write_manifest_atomically(self.path, first, generation_path(self.path, old.generation))
        write_manifest_atomically(self.path, new, generation_path(self.path, gid))
        new.history = [*history, history_record(gid, old.generation, message or "; ".join(self.changes))]
        write_manifest_atomically(self.path, new, self.path / MANIFEST)  # the commit point
        self._load()
        return gid

    def _router_tensors(self) -> dict[str, torch.Tensor]:
        return {router_name(layer, part): t.contiguous() for layer in sorted(self._edited_routers)
                for part, t in self._routers[layer].items()}  # fmt: skip

    def _write_experts(self, name: str, experts: dict, layouts: dict) -> int:
        """The staged experts, back to back at ALIGN-aligned offsets, into a new file -> its size."""
        keys_of = {layout: key for key, layout in layouts.items()}
        zeros: dict[str, ExpertEntry] = {}
        pos = 0
        with _ExpertsFile(self.path / name) as out:
            for (layer, e), stored in sorted(self._staged.items()):
                layout = self._layout(layer) if stored == ZERO else layout_like(stored, self._layout(layer))
                if layout not in keys_of:
                    keys_of[layout] = str(len(layouts))
                    layouts[keys_of[layout]] = layout
                key = keys_of[layout]
                if stored == ZERO and key in zeros:
                    experts[(layer, e)] = zeros[key]
                    continue
                view, nbytes = pack_expert(layout, stored if stored != ZERO else None)
                experts[(layer, e)] = ExpertEntry(pos, nbytes, key, zlib.crc32(view[:nbytes]), name)
                if stored == ZERO:
                    zeros[key] = experts[(layer, e)]
                out.write(view)
                pos += len(view)
            out.sync()
        return pos

    # ---------------------------------------------------------------------------------------- history

    def generations(self) -> list[dict]:
        """{id, parent, time, message, current} of every kept generation, oldest first."""
        history = self.manifest.history or [
            history_record(self.generation, None, "as converted", stamp=False)
        ]
        return [{**h, "current": h["id"] == self.generation} for h in history]

    def rollback(self, generation: int) -> None:
        """Make a kept generation current again (the later ones stay until gc)."""
        self._check_clean("rollback")
        ids = [h["id"] for h in self.generations()]
        if generation not in ids:
            raise MoepagerError(f"{self.path}: no generation {generation}; kept: {', '.join(map(str, ids))}")
        if generation == self.generation:
            return
        target = read_manifest(self.path, generation)
        target.history = self.manifest.history
        write_manifest_atomically(self.path, target, self.path / MANIFEST)
        self._load()

    def gc(self, keep: list[int] = ()) -> tuple[list[int], int]:
        """Drop every generation but the current one and `keep`, and the files only they used ->
        (generations dropped, bytes freed). Readers still on a dropped generation lose it."""
        self._check_clean("gc")
        keep_ids = {self.generation, *keep}
        history = self.generations()
        unknown = keep_ids - {h["id"] for h in history}
        if unknown:
            raise MoepagerError(f"{self.path}: no generation {min(unknown)} to keep")
        dropped = [h["id"] for h in history if h["id"] not in keep_ids]
        if not dropped or not self.manifest.history:
            return [], 0
        try:  # read before the dropped ones go: their experts' bytes are freed where no kept one uses them
            dead = dead_experts(
                [read_manifest(self.path, g) for g in dropped],
                [read_manifest(self.path, g) for g in keep_ids],
            )
        except MoepagerError:  # a damaged generation: free no expert bytes (verify reports it)
            dead = []
        current = self.manifest
        current.history = [
            {k: v for k, v in h.items() if k != "current"} for h in history if h["id"] in keep_ids
        ]
        write_manifest_atomically(self.path, current, self.path / MANIFEST)
        self._load()
        return dropped, self._remove_unreferenced() + punch_experts(self.path, dead)

    def _check_clean(self, what: str) -> None:
        if self.dirty:
            raise MoepagerError(
                f"{self.path}: uncommitted edits ({', '.join(self.changes)}); commit before {what}"
            )

    def _remove_unreferenced(self) -> int:
        """Delete files no kept generation uses (from killed commits, or dropped by gc) -> bytes freed."""
        ids = {h["id"] for h in self.manifest.history}
        used = set(self.manifest.files)
        for g in ids:
            try:
                used |= set(read_manifest(self.path, g).files)
            except MoepagerError:  # a damaged old generation: keep every file (verify reports it)
                return 0
        freed = 0
        for p in list(self.path.iterdir()) + list((self.path / GENERATIONS).glob("*")):
            if p.parent.name == GENERATIONS:
                stem = p.name.removesuffix(".json")
                stale = not (stem.isdigit() and int(stem) in ids)
            else:
                stale = (_COMMITTED.fullmatch(p.name) and p.name not in used) or bool(_TEMP.fullmatch(p.name))
            if stale and p.is_file():
                freed += p.stat().st_size
                p.unlink()
        fsync_dir(self.path)
        return freed


# -------------------------------------------------------------------------------------------- helpers


def read_router(source: StoreSource, layer: int) -> dict[str, torch.Tensor]:
    """A layer's router tensors in the source's generation (weight [E, D]; bias, e_score_correction_bias [E]
    where the family has them), read alone from the dense files (a later file's tensors win)."""
    found: dict[str, torch.Tensor] = {}
    for name in source.manifest.dense_files:
        infos = read_header(source.path / name)
        for part in ROUTER_PARTS:
            if router_name(layer, part) in infos:
                found[part] = read_tensor(infos[router_name(layer, part)]).clone()
    if "weight" not in found:
        raise MoepagerError(f"{source.path}: layer {layer} has no router weight in the store")
    return found


def open_store(path: str | Path, writable: bool = False, **options) -> EditableStore | StoreSource:
    """A store for reading (StoreSource; options: generation, verify_checksums, reader) or, with writable,
    for editing (EditableStore)."""
    if writable:
        if options:
            raise TypeError(f"options for a writable store: none, got {', '.join(options)}")
        return EditableStore(path)
    return StoreSource(path, **options)
