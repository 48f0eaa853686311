"""`moepager synth`: write a large random MoE checkpoint in the Hugging Face layout, for benchmarks.

Owns the tensor list of each family it can synthesize and the streaming safetensors writer. The files are
written tensor by tensor (bounded memory, whatever the size) into a temporary folder that is renamed into
place only when complete, so a half-written checkpoint never looks like a model. It does not know about
the engine or the cache: anything that reads a Hugging Face checkpoint can read what it writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MoepagerError

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}  # fmt: skip
FAMILIES = ("mixtral", "qwen3_moe")
_CHUNK = 16 << 20  # elements generated at once: bounds the writer's memory to ~100 MB


@dataclass
class SynthSpec:
    family: str = "mixtral"
    hidden: int = 2048  # D
    intermediate: int = 6144  # I of one routed expert
    experts: int = 8  # E
    top_k: int = 2  # K
    layers: int = 0  # 0 = as many as fit in `size`
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 32000
    dtype: str = "bfloat16"
    seed: int = 0
    std: float = 0.02  # of every linear weight (uniform, so it is cheap to draw)
    router_std: float = 0.5  # larger, so routing spreads over experts like a trained router's


def _dtype(spec: SynthSpec) -> torch.dtype:
    if spec.dtype not in _DTYPE_NAMES:
        raise MoepagerError(f"--dtype {spec.dtype!r} is not supported; use bfloat16, float16 or float32")
    return _DTYPE_NAMES[spec.dtype]


def _layer_tensors(spec: SynthSpec, i: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(hub name, shape, init) of one decoder layer; init is 'ones', 'linear' or 'router'."""
    d, q, kv, inter = (
        spec.hidden,
        spec.heads * spec.head_dim,
        spec.kv_heads * spec.head_dim,
        spec.intermediate,
    )
    p = f"model.layers.{i}."
    out = [
        (p + "input_layernorm.weight", (d,), "ones"),
        (p + "post_attention_layernorm.weight", (d,), "ones"),
    ]
    out += [(p + "self_attn.q_proj.weight", (q, d), "linear"), (p + "self_attn.k_proj.weight", (kv, d), "linear"),
            (p + "self_attn.v_proj.weight", (kv, d), "linear"), (p + "self_attn.o_proj.weight", (d, q), "linear")]  # fmt: skip
    if spec.family == "mixtral":
        out.append((p + "block_sparse_moe.gate.weight", (spec.experts, d), "router"))
        for e in range(spec.experts):
            x = f"{p}block_sparse_moe.experts.{e}."
            out += [(x + "w1.weight", (inter, d), "linear"), (x + "w2.weight", (d, inter), "linear"),
                    (x + "w3.weight", (inter, d), "linear")]  # fmt: skip
    else:  # qwen3_moe
        out += [(p + "self_attn.q_norm.weight", (spec.head_dim,), "ones"),
                (p + "self_attn.k_norm.weight", (spec.head_dim,), "ones"),
                (p + "mlp.gate.weight", (spec.experts, d), "router")]  # fmt: skip
        for e in range(spec.experts):
            x = f"{p}mlp.experts.{e}."
            out += [(x + "gate_proj.weight", (inter, d), "linear"), (x + "up_proj.weight", (inter, d), "linear"),
                    (x + "down_proj.weight", (d, inter), "linear")]  # fmt: skip
    return out


def _edge_tensors(spec: SynthSpec) -> tuple[list, list]:
    head = [("model.embed_tokens.weight", (spec.vocab, spec.hidden), "linear")]
    tail = [
        ("model.norm.weight", (spec.hidden,), "ones"),
        ("lm_head.weight", (spec.vocab, spec.hidden), "linear"),
    ]
    return head, tail


def _nbytes(tensors, itemsize: int) -> int:
    return sum(math.prod(shape) * itemsize for _, shape, _ in tensors)


def plan(spec: SynthSpec, size: int | None) -> SynthSpec:
    """Fill in `layers` from a target size in bytes (when not given)."""
    if spec.family not in FAMILIES:
        raise MoepagerError(
            f"--family {spec.family!r} cannot be synthesized; use one of {', '.join(FAMILIES)}"
        )
    if spec.top_k > spec.experts or min(spec.hidden, spec.intermediate, spec.experts, spec.top_k) < 1:
        raise MoepagerError("need hidden, intermediate, experts >= 1 and 1 <= top-k <= experts")
    if spec.heads % spec.kv_heads:
        raise MoepagerError(f"--heads {spec.heads} must be a multiple of --kv-heads {spec.kv_heads}")
    if spec.layers > 0:
        return spec
    if size is None:
        raise MoepagerError("give --size (e.g. 8GiB) or --layers")
    itemsize = _dtype(spec).itemsize
    head, tail = _edge_tensors(spec)
    per_layer = _nbytes(_layer_tensors(spec, 0), itemsize)
    layers = (size - _nbytes(head + tail, itemsize)) // per_layer
    if layers < 1:
        raise MoepagerError(
            f"--size {size} bytes is smaller than one layer ({per_layer} bytes) plus embeddings"
        )
    return SynthSpec(**{**asdict(spec), "layers": int(layers)})


def hf_config(spec: SynthSpec) -> dict:
    common = dict(
        vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
        hidden_act="silu", attention_dropout=0.0, initializer_range=spec.std, use_cache=True,
        bos_token_id=1, eos_token_id=2, dtype=spec.dtype if spec.dtype != "bf16" else "bfloat16",
    )  # fmt: skip
    if spec.family == "mixtral":
        return dict(architectures=["MixtralForCausalLM"], model_type="mixtral", **common,
                    intermediate_size=spec.intermediate, num_local_experts=spec.experts,
                    num_experts_per_tok=spec.top_k, sliding_window=None, router_aux_loss_coef=0.0)  # fmt: skip
    return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", **common,
                intermediate_size=spec.intermediate * 3, moe_intermediate_size=spec.intermediate,
                num_experts=spec.experts, num_experts_per_tok=spec.top_k, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, use_sliding_window=False,
                sliding_window=None, router_aux_loss_coef=0.0)  # fmt: skip


def _shards(tensors: list, itemsize: int, max_shard: int) -> list[list]:
    shards, cur, cur_bytes = [], [], 0
    for t in tensors:
        n = math.prod(t[1]) * itemsize
        if cur and cur_bytes + n > max_shard:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += n
    return shards + [cur] if cur else shards


def _header(tensors: list, dtype: torch.dtype) -> bytes:
    meta, offset = {"__metadata__": {"format": "pt", "written_by": "moepager synth"}}, 0
    for name, shape, _ in tensors:
        n = math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, shape, init: str, spec: SynthSpec, dtype: torch.dtype, gen: torch.Generator, progress):
    total = math.prod(shape)
    if init == "ones":
        f.write(torch.ones(total, dtype=dtype).view(torch.uint8).numpy())
        progress(total * dtype.itemsize)
        return
    bound = (spec.router_std if init == "router" else spec.std) * math.sqrt(3)  # uniform with that std
    buf = torch.empty(min(total, _CHUNK))
    for start in range(0, total, _CHUNK):
        n = min(_CHUNK, total - start)
        chunk = buf[:n].uniform_(-bound, bound, generator=gen).to(dtype)
        f.write(chunk.view(torch.uint8).numpy())
        progress(n * dtype.itemsize)


def synth(out: str | Path, spec: SynthSpec, size: int | None = None, max_shard: int = 2 << 30,
          progress_bar: bool = True) -> Path:  # fmt: skip
    """Write the checkpoint to `out` (which must not exist) and return its path."""
    out = Path(out)
    if out.exists():
        raise MoepagerError(f"{out} already exists; remove it or choose another folder")
    spec = plan(spec, size)
    dtype = _dtype(spec)
    head, tail = _edge_tensors(spec)
    tensors = head + [t for i in range(spec.layers) for t in _layer_tensors(spec, i)] + tail
    total = _nbytes(tensors, dtype.itemsize)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if total > free:
        raise MoepagerError(f"{out}: needs {total / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(spec.seed)
    from ..system import progress  # its progress_bar, not this function's flag of that name

    bar = progress.progress_bar(total=total, unit="B", unit_scale=True, desc=f"synth {out.name}",
                                enabled=progress_bar)  # fmt: skip
    try:
        shards = _shards(tensors, dtype.itemsize, max_shard)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        if len(shards) == 1:
            names = ["model.safetensors"]
        for name, shard in zip(names, shards):
            with open(tmp / name, "wb") as f:
                f.write(_header(shard, dtype))
                for _, shape, init in shard:
                    _write_tensor(f, shape, init, spec, dtype, gen, bar.update)
                f.flush()
                os.fdatasync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # leave the page cache as it was
        if len(shards) > 1:
            weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(hf_config(spec), indent=1))
        (tmp / "synth.json").write_text(json.dumps({**asdict(spec), "total_bytes": total}, indent=1))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out
