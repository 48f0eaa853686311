"""llama.cpp's CPU numerics for quantized weights, written out in numpy as an independent reference: before a
product with a block-quantized matrix, ggml rounds each token's activations to 8-bit blocks (the weight
type's dot-product partner) and takes integer dot products. The result equals dequantize(w) @ rounded(x) up
to float32 summation order, so a reference only has to round x the same way:
- Q8_0 (partner of Q4_0, Q5_0, Q8_0, MXFP4) and Q8_1 (Q4_1, Q5_1): blocks of 32, d = amax / 127 stored as
  fp16, q = round-half-even(x * (127 / amax)) (ggml's AVX2 quantize_row_q8_0);
- Q8_K (the K-quants): blocks of 256, iscale = -127 / (the value of largest magnitude), q = min(127,
  round-half-even(iscale * x)), d = 1 / iscale kept in float32 (quantize_row_q8_K_ref).
Q8_1 also carries s = fp16(d * sum q), which Q4_1 / Q5_1 products use for their offsets: those two types
agree with this reference only to ~1e-3 (the fp16 rounding of s).
"""

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
K_TYPES = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
OFFSET_TYPES = {Q.Q4_1, Q.Q5_1}  # partner Q8_1: the reference is ~1e-3 off, see above


def round_q8_0(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return (np.rint(b * inv) * d).reshape(x.shape)


def round_q8_k(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).reshape(-1, 256)
    big = b[np.arange(len(b)), np.abs(b).argmax(-1)][:, None]  # the value of largest magnitude, signed
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(big != 0, np.float32(-127) / big, np.float32(0)).astype(np.float32)
        d = np.where(big != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return (np.minimum(np.rint(iscale * b), 127) * d).reshape(x.shape)


def round_activations(qtype: int, x: torch.Tensor) -> torch.Tensor:
    """x float32 [..., C] as ggml hands it to the dot products with a `qtype` matrix."""
    if qtype == Q.F32:
        return x.detach().float()
    if qtype == Q.F16:  # fp16 rows take fp16 activations
        return x.detach().half().float()
    rounded = round_q8_k if qtype in K_TYPES else round_q8_0
    return torch.from_numpy(rounded(x.detach().float().numpy()))


def random_blocks(qtype: int, *shape: int, seed: int = 0) -> np.ndarray:
    """uint8 [*shape[:-1], row bytes] for `shape[-1]` weights a row: random codes and sub-scales, with each
    block's scales small and finite (fp16 d / dmin, or MXFP4's exponent byte)."""
    rng = np.random.default_rng(seed)
    qk, bb = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // qk, bb), dtype=np.uint8)
    if qtype == Q.MXFP4:
        raw[..., 0] = rng.integers(118, 124, raw.shape[:-1])  # e8m0 scales 2^-9 .. 2^-4
    for o in FP16_FIELDS.get(qtype, []):
        raw[..., o : o + 2] = rng.normal(0, 0.01, raw.shape[:-1]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(*shape[:-1], -1)


# where each type keeps its fp16 block scales (d, and m or dmin), in bytes from the block's start
FP16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}  # fmt: skip


def emulate_llama_numerics(floats, compact, monkeypatch) -> None:
    """Make `floats` (an engine over a GGUF's dequantized weights) round activations as `compact` (the same
    file computed on its blocks) must: before each matrix that `compact` keeps as blocks, by that matrix's
    type. The float path stays the reference's own (F.linear over float weights); only its inputs change."""
    from moepager.model.compact import BlockLinear

    for name, module in compact.model.named_modules():
        if isinstance(module, BlockLinear):
            qtype = module.qtype
            floats.model.get_submodule(name).register_forward_pre_hook(
                lambda _, args, qtype=qtype: (round_activations(qtype, args[0]).to(args[0].dtype),)
            )
    floats.experts.dense = False  # every pair through the banks, where the rounding goes in
    for layer, bank in compact.experts.banks.items():
        qtypes = {part: getattr(matrix, "qtype", None) for part, matrix in bank.matrices.items()}
        for part, reference in floats.experts.banks[layer].matrices.items():
            qtype = qtypes.get(part, qtypes.get("gate"))  # floats fuse gate and up (one type in these files)
            if qtype is None:  # kept as floats (rows that are not whole blocks)
                continue
            for method in ("apply", "gather_mv"):
                plain = getattr(reference, method)
                rounded = lambda x, s, plain=plain, q=qtype: plain(round_activations(q, x).to(x.dtype), s)
                monkeypatch.setattr(reference, method, rounded)
