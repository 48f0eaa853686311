"""`moepager experts STORE ...`: list, show, export and import single experts, add, remove, disable, enable,
and the generations of a store (list, rollback, gc). Each edit is committed as its own generation.

An expert travels as a safetensors file of its canonical tensors (gate [I, D], up [I, D], down [D, I], the
family's biases) plus its router row ("router" [D]; "router_bias", "correction_bias" [1] where the family has
them). The CLI parses argv and calls these; they return the text to print.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MoepagerError
from ..store.editable import EditableStore, read_router
from ..store.reading import StoreSource

ROUTER_KEYS = {"router": "weight", "router_bias": "bias", "correction_bias": "e_score_correction_bias"}


def run(path: str, action: str, values: list[str], message: str, router: bool, keep: str | None) -> str:
    """One `moepager experts` action on its positional values (LAYER EXPERT [FILE], LAYER FILE, GENERATION)."""
    if action == "list":
        return list_experts(path)
    if action == "generations":
        return list_generations(path)
    if action == "gc":
        return gc(path, _ints(action, (keep or "").replace(",", " ").split()))
    if action == "rollback":
        return rollback(path, _ints(action, values[:1], 1)[0])
    if action == "add":
        layer, file = _ints(action, values[:1], 1)[0], (values[1:2] or [None])[0]
        if file is None:
            raise MoepagerError("experts add needs LAYER FILE")
        return add_expert(path, layer, file, message)
    layer, expert = _ints(action, values[:2], 2)
    if action in ("export", "import") and len(values) < 3:
        raise MoepagerError(f"experts {action} needs LAYER EXPERT FILE")
    if action == "show":
        return show_expert(path, layer, expert)
    if action == "export":
        return export_expert(path, layer, expert, values[2])
    if action == "import":
        return import_expert(path, layer, expert, values[2], router, message)
    return edit_expert(path, action, layer, expert, message)  # remove, disable, enable


def _ints(action: str, values: list[str], n: int | None = None) -> list[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        out = []
    if (n is not None and len(out) != n) or len(out) != len(values):
        raise MoepagerError(f"experts {action}: bad arguments {' '.join(values)!r} (see --help)")
    return out


def _reader(path: str | Path) -> StoreSource:
    return StoreSource(path)


def _check(src: StoreSource, layer: int, expert: int) -> None:
    c = src.config
    if not (0 <= layer < c.num_layers and c.moe_layers[layer] and 0 <= expert < c.num_experts):
        raise MoepagerError(f"{src.path}: no routed expert {expert} in layer {layer} (E={c.num_experts})")


def list_experts(path: str | Path) -> str:
    src = _reader(path)
    c = src.config
    lines = [
        f"{src.path}: generation {src.manifest.generation}, {c.family}, E={c.num_experts}, top_k={c.top_k}"
    ]
    for layer in range(c.num_layers):
        if c.moe_layers[layer]:
            absent = sorted(c.absent_experts.get(layer, ()))
            gone = f", absent: {', '.join(map(str, absent))}" if absent else ""
            lines.append(f"layer {layer}: {c.num_experts - len(absent)} experts{gone}")
    return "\n".join(lines)


def show_expert(path: str | Path, layer: int, expert: int) -> str:
    src = _reader(path)
    _check(src, layer, expert)
    entry = src.manifest.experts[(layer, expert)]
    layout = src.manifest.layouts[entry.layout]
    state = "absent" if expert in src.config.absent_experts.get(layer, ()) else "routed"
    lines = [f"expert {expert} of layer {layer} ({state}): {entry.file} bytes {entry.offset}.."
             f"{entry.offset + entry.nbytes}, crc32 {entry.crc32:08x}, encoding {layout.encoding}"]  # fmt: skip
    weights = src.read_expert(layer, expert)
    for t in layout.tensors:
        w = weights[t.name]
        norm = f", norm {w.float().norm():.4g}" if w.is_floating_point() else ""
        lines.append(f"  {t.name}: {str(t.dtype).removeprefix('torch.')} {list(t.shape)}{norm}")
    for part, r in read_router(src, layer).items():
        value = f"norm {r[expert].float().norm():.4g}" if r.dim() == 2 else f"{r[expert].item():.4g}"
        lines.append(f"  router {part}: {value}")
    return "\n".join(lines)


def export_expert(path: str | Path, layer: int, expert: int, out: str | Path) -> str:
    from safetensors.torch import save_file

    src = _reader(path)
    _check(src, layer, expert)
    tensors = {k: v.contiguous() for k, v in src.read_expert(layer, expert).items()}
    router = read_router(src, layer)
    for key, part in ROUTER_KEYS.items():
        if part in router:
            row = router[part][expert]
            tensors[key] = (row if row.dim() else row[None]).contiguous()
    meta = {"format": "moepager-expert", "layer": str(layer), "expert": str(expert)}
    save_file(tensors, str(out), metadata=meta)
    return f"wrote {out}"


def _read_expert_file(file: str | Path) -> tuple[dict, dict]:
    """-> (canonical weights, router values by ROUTER_KEYS name)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise MoepagerError(f"{file}: not a readable safetensors file ({e})") from None
    router = {k: tensors.pop(k) for k in ROUTER_KEYS if k in tensors}
    return tensors, router


def _router_args(router: dict) -> dict:
    return {"router_bias": router["router_bias"].item() if "router_bias" in router else None,
            "correction_bias": router["correction_bias"].item() if "correction_bias" in router else None}  # fmt: skip


def import_expert(
    path: str | Path, layer: int, expert: int, file: str | Path, with_router: bool, message: str
) -> str:
    weights, router = _read_expert_file(file)
    with EditableStore(path) as st:
        st.replace(layer, expert, weights)
        if with_router:
            if "router" not in router:
                raise MoepagerError(f"{file}: no 'router' tensor [D]; import without --router")
            args = _router_args(router)
            st.set_router_row(layer, expert, router["router"], args["router_bias"], args["correction_bias"])
        gen = st.commit(message or f"import {layer}:{expert} from {Path(file).name}")
    return f"expert {expert} of layer {layer} replaced: generation {gen}"


def add_expert(path: str | Path, layer: int, file: str | Path, message: str) -> str:
    weights, router = _read_expert_file(file)
    if "router" not in router:
        raise MoepagerError(f"{file}: no 'router' tensor [D]: a new expert needs its router row")
    with EditableStore(path) as st:
        args = _router_args(router)
        expert = st.add(layer, weights, router["router"], args["router_bias"], args["correction_bias"])
        gen = st.commit(message or f"add {layer}:{expert} from {Path(file).name}")
    return f"added expert {expert} to layer {layer}: generation {gen}"


def edit_expert(path: str | Path, action: str, layer: int, expert: int, message: str) -> str:
    """remove, disable or enable."""
    with EditableStore(path) as st:
        getattr(st, action)(layer, expert)
        gen = st.commit(message)
    return f"{action} expert {expert} of layer {layer}: generation {gen}"


def list_generations(path: str | Path) -> str:
    """One line per kept generation, oldest first, starting with the id rollback takes; * marks the current."""
    from ..store.format import read_manifest

    manifest = read_manifest(Path(path))
    history = manifest.history or [
        {"id": manifest.generation, "parent": None, "time": "", "message": "as converted"}
    ]
    lines = []
    for h in history:
        mark = "*" if h["id"] == manifest.generation else " "
        parent = f"parent {h['parent']}" if h["parent"] is not None else "root"
        lines.append(f"{h['id']} {mark} {h['time'] or '-'} {parent}: {h['message']}")
    return "\n".join(lines)


def rollback(path: str | Path, generation: int) -> str:
    with EditableStore(path) as st:
        st.rollback(generation)
    return f"{path}: generation {generation} is current"


def gc(path: str | Path, keep: list[int]) -> str:
    with EditableStore(path) as st:
        dropped, freed = st.gc(keep)
    if not dropped:
        return f"{path}: nothing to drop"
    return f"{path}: dropped generations {', '.join(map(str, dropped))}, freed {freed / 2**20:.1f} MiB"
