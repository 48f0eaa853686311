"""`moepager export STORE OUT`: a store's current generation as a standard Hugging Face checkpoint.

Owns writing a store back under the hub's names (sources/checkpoint.py `hub_name`), with each family's
expert layout. Absent experts (removed, disabled, padding) are left out and the rest renumbered,
which transformers can load when every MoE layer keeps the same number of experts. Quantized stores are
refused: their float weights are gone. Sharded: the dense tensors, then one file per MoE layer's experts (so
memory holds one layer of experts at a time). Written into a hidden folder beside OUT, fsynced, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..sources.checkpoint import hub_name
from ..system.durable import fsync_dir
from .editable import COUNT_KEYS
from .reading import StoreSource

_MIXTRAL_STYLE = {"gate": "w1", "up": "w3", "down": "w2"}  # block_sparse_moe.experts.N.w1|w2|w3
_QWEN_STYLE = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # mlp.experts.N.*_proj


def _expert_tensors(family: str, layer: int, experts: list[dict]) -> dict[str, torch.Tensor]:
    """One layer's experts (kept ones, renumbered) under the family's hub names."""
    p = f"model.layers.{layer}."
    if family == "gpt_oss":  # stacked, input-major, gate and up interleaved
        return {
            p + "mlp.experts.gate_up_proj": torch.stack(
                [torch.stack([x["gate"].t(), x["up"].t()], -1).flatten(1) for x in experts]),
            p + "mlp.experts.gate_up_proj_bias": torch.stack(
                [torch.stack([x["gate_bias"], x["up_bias"]], -1).flatten() for x in experts]),
            p + "mlp.experts.down_proj": torch.stack([x["down"].t() for x in experts]),
            p + "mlp.experts.down_proj_bias": torch.stack([x["down_bias"] for x in experts]),
        }  # fmt: skip
    prefix, names = (
        ("block_sparse_moe", _MIXTRAL_STYLE) if family in ("mixtral", "phimoe") else ("mlp", _QWEN_STYLE)
    )
    return {f"{p}{prefix}.experts.{e}.{names[k]}.weight": x[k].contiguous()
            for e, x in enumerate(experts) for k in ("gate", "up", "down")}  # fmt: skip


def export(store: str | Path, out: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Write the current generation of `store` to the checkpoint folder `out`; return its path."""
    from safetensors.torch import save_file

    from ..system.progress import progress_bar

    src = StoreSource(store)
    m, c = src.manifest, src.config
    if any(layout.encoding != "plain" for layout in m.layouts.values()):
        raise MoepagerError(f"{src.path}: its experts are quantized; a Hugging Face checkpoint needs the float "
                            "weights: export the store they were converted from")  # fmt: skip
    kept = {layer: [e for e in range(c.num_experts) if e not in c.absent_experts.get(layer, ())]
            for layer in range(c.num_layers) if c.moe_layers[layer]}  # fmt: skip
    counts = {len(ids) for ids in kept.values()}
    if len(counts) > 1:
        detail = ", ".join(f"layer {layer}: {len(ids)}" for layer, ids in kept.items())
        raise MoepagerError(f"{src.path}: MoE layers hold different numbers of experts ({detail}); a Hugging Face "
                            "config has one count: add or remove experts until they agree")  # fmt: skip
    out = Path(out).expanduser().absolute()
    if out.exists() and not (
        force and (out / "config.json").is_file() and not (out / "manifest.json").exists()
    ):
        raise MoepagerError(f"{out} exists; pass --force to replace a checkpoint folder there")
    dense: dict[str, torch.Tensor] = {}
    for name, t in src.dense_state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if ".ffn.router." in name:  # absent experts' rows dropped
            t = t[kept[layer]]
        dense[hub_name(name, c.family)] = t.contiguous()
    # one shard for the dense tensors, one per MoE layer's experts: memory stays at one layer of experts
    shards = [lambda: dense] + [
        (
            lambda layer=layer, ids=ids: _expert_tensors(
                c.family, layer, [src.read_expert(layer, e) for e in ids]
            )
        )
        for layer, ids in kept.items()
    ]
    config = dict(m.config)
    for key in COUNT_KEYS:
        if isinstance(config.get(key), int) and counts:
            config[key] = next(iter(counts))
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map, total = {}, 0
        for i, make in enumerate(progress_bar(shards, desc="export", unit="shard", enabled=progress)):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = make()
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        data = {x.file for x in m.experts.values()} | set(m.dense_files)
        for name in m.files:
            if name not in data:
                shutil.copyfile(src.path / name, tmp / name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
