"""The model shapes `moepager synth --format gguf` writes, and the plan of one file: every tensor's llama.cpp
name, shape and ggml type.

Owns the facts of each real model (from its config.json, as llama.cpp's converter writes them) and the choice of
type per tensor that llama.cpp's quantizer (src/llama-quant.cpp) makes for Q4_K_M, Q4_0 and Q8_0, including
its fallback for rows that are not a whole number of 256-wide blocks. It does not write bytes (synth/gguf.py).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    feed_forward: (
        int  # {arch}.feed_forward_length as the converter writes it (the config's intermediate_size)
    )
    rope_theta: float
    norm_eps: float
    context: int  # {arch}.context_length: the config's max_position_embeddings
    qk_norm: bool = False  # per-head q/k RMSNorm (Qwen3)
    # GPT-OSS
    biases: bool = False  # biases on q/k/v/o, on the router and on every expert matrix
    sinks: bool = False  # a learned per-head logit in the attention softmax (attn_sinks)
    sliding_window: int = 0  # tokens seen by the even layers' attention; 0: every layer sees everything
    yarn: tuple[float, int] | None = None  # YaRN rope scaling: (factor, original context length)
    yarn_mscale: float = 0.0  # DeepSeek's mscale_all_dim (0: none)
    expert_type: str | None = None  # the experts' ggml type whatever --quant (GPT-OSS ships them in MXFP4)
    # DeepSeek (deepseek2): multi-head latent attention, whose head_dim is qk_nope + rope_dim; leading dense layers
    # (feed_forward wide) and always-on shared experts beside the routed ones
    kv_lora_rank: int = 0  # 0: plain attention
    q_lora_rank: int = 0  # 0: one attn_q projection (DeepSeek-V2-Lite)
    rope_dim: int = 0
    v_head_dim: int = 0
    dense_layers: int = 0
    shared_experts: int = 0


SHAPES = {
    "qwen3-30b-a3b": Shape("qwen3moe", 48, 2048, 32, 4, 128, 128, 8, 768, 6144, 1e6, 1e-6, 40960, qk_norm=True),
    "mixtral-8x7b": Shape("llama", 32, 4096, 32, 8, 128, 8, 2, 14336, 14336, 1e6, 1e-5, 32768),
    # openai/gpt-oss-20b's config.json: alternate layers slide over 128 tokens; experts stay MXFP4 in every GGUF
    "gpt-oss-20b": Shape("gpt-oss", 24, 2880, 64, 8, 64, 32, 4, 2880, 2880, 150000.0, 1e-5, 131072,
                         biases=True, sinks=True, sliding_window=128, yarn=(32.0, 4096), expert_type="MXFP4"),
    # deepseek-ai/DeepSeek-V2-Lite's config.json: MLA without a q latent, layer 0 dense, 2 shared experts,
    # softmax routing (greedy top-6), YaRN x40 over 4096 positions (mscale_all_dim 0.707)
    "deepseek-v2-lite": Shape("deepseek2", 27, 2048, 16, 16, 192, 64, 6, 1408, 10944, 10000.0, 1e-6, 163840,
                              yarn=(40.0, 4096), yarn_mscale=0.707, kv_lora_rank=512, rope_dim=64, v_head_dim=128, dense_layers=1,
                              shared_experts=2),
    # not a released model: the small Qwen3-MoE shape of the project's compute benchmarks (benchmarks/README.md)
    "qwen3-64x4": Shape("qwen3moe", 8, 512, 16, 4, 128, 64, 4, 320, 2560, 1e6, 1e-6, 40960, qk_norm=True),
}  # fmt: skip
QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")
FILE_TYPES = {"Q4_K_M": 15, "Q4_0": 2, "Q8_0": 7}  # llama_ftype, written as general.file_type


def _fit(qtype, cols: int):
    """llama.cpp's tensor_type_fallback: a 256-wide block type on rows it does not divide (GPT-OSS's 2880)
    becomes the 32-wide type it names."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    return {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}[qtype]


def quant_type(quant: str, role: str, layer: int, shape: Shape):
    """The type llama.cpp's quantizer gives a matrix of `role` (embed, output, attn_k, attn_v, attn_output,
    ffn_down or other) in `layer`, before the fallback. Q4_K_M gives attn_v and ffn_down Q6_K in the first and
    last eighth of the layers and every third one between (its use_more_bits); with exactly 8 experts (Mixtral)
    attn_k and attn_v are Q8_0 in every type and Q4_K_M's attn_output is Q5_K; the output is Q6_K."""
    from gguf import GGMLQuantizationType as Q

    n, eight = shape.layers, shape.experts == 8
    base = {"Q4_K_M": Q.Q4_K, "Q4_0": Q.Q4_0, "Q8_0": Q.Q8_0}[quant]
    more_bits = layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2
    if role == "output":
        return Q.Q8_0 if quant == "Q8_0" else Q.Q6_K
    if role in ("attn_k", "attn_v") and eight:
        return Q.Q8_0
    if role in ("attn_v", "ffn_down") and quant == "Q4_K_M" and more_bits:
        return Q.Q6_K
    if role == "attn_output" and quant == "Q4_K_M" and eight:
        return Q.Q5_K
    return base


def tensors(shape: Shape, quant: str, vocab: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(llama.cpp name, shape outer first, ggml type) of every tensor, in file order."""
    from gguf import GGMLQuantizationType as Q

    d, e, i_ff = shape.hidden, shape.experts, shape.expert_ff
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    experts = Q[shape.expert_type] if shape.expert_type else None
    out = []

    def matrix(name: str, dims: tuple[int, ...], role: str, layer: int = 0) -> None:
        if name.endswith("_exps.weight") and experts is not None:
            out.append((name, dims, experts))
        else:
            out.append((name, dims, _fit(quant_type(quant, role, layer, shape), dims[-1])))

    def vector(name: str, dims: tuple[int, ...]) -> None:
        out.append((name, dims, Q.F32))

    matrix("token_embd.weight", (vocab, d), "embed")
    for i in range(shape.layers):
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", (d,))
        if shape.kv_lora_rank:
            _latent_attention(shape, b, i, matrix, vector)
        else:
            for part, rows, role in (
                ("attn_q", q, "other"),
                ("attn_k", kv, "attn_k"),
                ("attn_v", kv, "attn_v"),
            ):
                matrix(b + part + ".weight", (rows, d), role, i)
                if shape.biases:
                    vector(b + part + ".bias", (rows,))
            matrix(b + "attn_output.weight", (d, q), "attn_output", i)
        if shape.biases:
            vector(b + "attn_output.bias", (d,))
        if shape.qk_norm:
            vector(b + "attn_q_norm.weight", (shape.head_dim,))
            vector(b + "attn_k_norm.weight", (shape.head_dim,))
        if shape.sinks:
            vector(b + "attn_sinks.weight", (shape.heads,))
        # GPT-OSS's converter names the pre-FFN norm after the checkpoint's post_attention_layernorm
        vector(b + ("post_attention_norm.weight" if shape.arch == "gpt-oss" else "ffn_norm.weight"), (d,))
        if i < shape.dense_layers:
            f = shape.feed_forward
            for part, dims in (("ffn_gate", (f, d)), ("ffn_up", (f, d)), ("ffn_down", (d, f))):
                matrix(b + part + ".weight", dims, "ffn_down" if part == "ffn_down" else "other", i)
            continue
        vector(b + "ffn_gate_inp.weight", (e, d))
        if shape.biases:
            vector(b + "ffn_gate_inp.bias", (e,))
        for part, dims in (
            ("ffn_gate_exps", (e, i_ff, d)),
            ("ffn_up_exps", (e, i_ff, d)),
            ("ffn_down_exps", (e, d, i_ff)),
        ):
            matrix(b + part + ".weight", dims, "ffn_down" if part == "ffn_down_exps" else "other", i)
            if shape.biases:
                vector(b + part + ".bias", dims[:2])
        if shape.shared_experts:
            f = shape.shared_experts * i_ff
            for part, dims in (
                ("ffn_gate_shexp", (f, d)),
                ("ffn_up_shexp", (f, d)),
                ("ffn_down_shexp", (d, f)),
            ):
                matrix(b + part + ".weight", dims, "ffn_down" if part == "ffn_down_shexp" else "other", i)
    vector("output_norm.weight", (d,))
    matrix("output.weight", (vocab, d), "output")
    return out


def _latent_attention(shape: Shape, b: str, i: int, matrix, vector) -> None:
    """DeepSeek's MLA as llama.cpp's converter writes it: kv_b_proj split into k_b [H, kv_rank, nope] and
    v_b [H, dv, kv_rank]; llama.cpp's quantizer treats every part as a plain matrix ("other")."""
    d, h, rank, rope = shape.hidden, shape.heads, shape.kv_lora_rank, shape.rope_dim
    nope = shape.head_dim - rope
    if shape.q_lora_rank:
        matrix(b + "attn_q_a.weight", (shape.q_lora_rank, d), "other", i)
        vector(b + "attn_q_a_norm.weight", (shape.q_lora_rank,))
        matrix(b + "attn_q_b.weight", (h * shape.head_dim, shape.q_lora_rank), "other", i)
    else:
        matrix(b + "attn_q.weight", (h * shape.head_dim, d), "other", i)
    matrix(b + "attn_kv_a_mqa.weight", (rank + rope, d), "other", i)
    vector(b + "attn_kv_a_norm.weight", (rank,))
    matrix(b + "attn_k_b.weight", (h, rank, nope), "other", i)
    matrix(b + "attn_v_b.weight", (h, shape.v_head_dim, rank), "other", i)
    matrix(b + "attn_output.weight", (d, h * shape.v_head_dim), "attn_output", i)
