"""Edited copies of tiny Hugging Face checkpoints, made on their safetensors files directly (independent of the
store code): the reference an edited store is compared with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PER_EXPERT = {"mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}, "gate"),
              "phimoe": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}, "gate")}  # fmt: skip
QWEN_NAMES = ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "gate")
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _count(config: dict) -> int:
    return next(config[k] for k in COUNT_KEYS if isinstance(config.get(k), int))


def read_layers(src: Path) -> tuple[dict, dict, dict]:
    """(config, other tensors, {layer: (experts [canonical dicts], router {weight, bias?})})."""
    config = json.loads((src / "config.json").read_text())
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    family, n = config["model_type"], _count(config)
    layers = {}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        if family == "gpt_oss":
            if p + "mlp.router.weight" not in sd:
                continue
            gu, gub = sd.pop(p + "mlp.experts.gate_up_proj"), sd.pop(p + "mlp.experts.gate_up_proj_bias")
            down, db = sd.pop(p + "mlp.experts.down_proj"), sd.pop(p + "mlp.experts.down_proj_bias")
            experts = [{"gate": gu[e][:, 0::2].t(), "up": gu[e][:, 1::2].t(), "down": down[e].t(),
                        "gate_bias": gub[e][0::2], "up_bias": gub[e][1::2], "down_bias": db[e]}
                       for e in range(n)]  # fmt: skip
            router = {"weight": sd.pop(p + "mlp.router.weight"), "bias": sd.pop(p + "mlp.router.bias")}
        else:
            prefix, names, gate = PER_EXPERT.get(family, QWEN_NAMES)
            if p + f"{prefix}.{gate}.weight" not in sd:
                continue
            experts = [{k: sd.pop(p + f"{prefix}.experts.{e}.{v}.weight") for k, v in names.items()}
                       for e in range(n)]  # fmt: skip
            router = {"weight": sd.pop(p + f"{prefix}.{gate}.weight")}
        layers[layer] = (experts, router)
    return config, sd, layers


def write_layers(src: Path, out: Path, config: dict, sd: dict, layers: dict) -> Path:
    """A checkpoint folder like src with these experts and routers (every layer must have as many)."""
    counts = {len(experts) for experts, _ in layers.values()}
    assert len(counts) == 1, counts
    n = counts.pop()
    config = dict(config)
    for k in COUNT_KEYS:
        if isinstance(config.get(k), int):
            config[k] = n
    family, sd = config["model_type"], dict(sd)
    for layer, (experts, router) in layers.items():
        p = f"model.layers.{layer}."
        if family == "gpt_oss":
            gu = torch.stack([torch.stack([x["gate"].t(), x["up"].t()], -1).flatten(1) for x in experts])
            gub = torch.stack([torch.stack([x["gate_bias"], x["up_bias"]], -1).flatten() for x in experts])
            sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.gate_up_proj_bias"] = gu, gub
            sd[p + "mlp.experts.down_proj"] = torch.stack([x["down"].t() for x in experts])
            sd[p + "mlp.experts.down_proj_bias"] = torch.stack([x["down_bias"] for x in experts])
            sd[p + "mlp.router.weight"], sd[p + "mlp.router.bias"] = router["weight"], router["bias"]
        else:
            prefix, names, gate = PER_EXPERT.get(family, QWEN_NAMES)
            for e, x in enumerate(experts):
                for k, v in names.items():
                    sd[p + f"{prefix}.experts.{e}.{v}.weight"] = x[k]
            sd[p + f"{prefix}.{gate}.weight"] = router["weight"]
    out.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".json")) or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    return out


def load_reference(path: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
