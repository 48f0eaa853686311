"""Where moepager and llama.cpp part on one GGUF, op by op, over the teacher-forced positions of
gguf_agreement.py (the first TOKENS of eval_gpl3.txt, one batch, llama.cpp with an f32 KV cache and without
flash attention, as there). llama.cpp's intermediate tensors come from its eval callback, in its own process;
moepager's from forward hooks. Usage:

    python benchmarks/gguf_divergence.py MODEL.gguf [--tokens 256] [--threads 2]

Prints layer 0 op by op (the largest relative difference over positions, and how many positions are bit for bit
equal), for a quantized file how many int8 values differ when each engine's attention input is rounded to Q8_0
blocks as ggml does before a quantized projection, then per layer the routing: the largest router-logit difference against the
median gap between the K-th and (K+1)-th logits, at how many positions moepager's fp32 softmax gives those two
experts the same probability (a tie each engine breaks its own way), and how many positions pick a different top-K set (and how
many of those for the first time: the rest inherited a difference from a layer below). Tensor names are those
of llama.cpp's graph callbacks (qwen2moe and the llama-like graphs: attn_norm-0, Qcur-0, ffn_moe_topk-0, ...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import moepager
from moepager.data import EVAL_TEXT

# ggml_tensor as ggml.h declares it at llama-cpp-python 0.3.36's llama.cpp (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS
# 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64); only name, type, ne, nb and data are read
LLAMA_CPP = """
import ctypes, json, sys
import numpy as np
import llama_cpp
model, ids_file, out, threads, wanted = sys.argv[1:6]
ids, wanted = json.load(open(ids_file)), wanted.split(",")
class Tensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]
DTYPES = {0: np.float32, 26: np.int32}  # GGML_TYPE_F32, GGML_TYPE_I32
saved = {}
def callback(ptr, ask, _):
    t = ctypes.cast(ptr, ctypes.POINTER(Tensor)).contents
    name = t.name.decode()
    want = name.rsplit("-", 1)[0] in wanted and t.type in DTYPES
    if ask:  # whether to see this tensor's data
        return want
    if not want or name in saved:  # the first tensor of a name: Qcur-0 before its reshape and rope
        return True
    ne, nb = list(t.ne), list(t.nb)
    raw = (ctypes.c_char * (nb[3] * ne[3])).from_address(t.data)
    flat = np.frombuffer(raw, dtype=DTYPES[t.type])
    saved[name] = np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1]).copy()
    return True
hook = llama_cpp.ggml_backend_sched_eval_callback(callback)
llama_cpp.llama_backend_init()
m = llama_cpp.llama_model_load_from_file(model.encode(), llama_cpp.llama_model_default_params())
p = llama_cpp.llama_context_default_params()
p.n_ctx, p.n_batch, p.n_ubatch = len(ids) + 8, len(ids), len(ids)
p.n_threads = p.n_threads_batch = int(threads)
p.type_k = p.type_v = 0  # f32 KV cache
p.flash_attn_type = 0  # off, as Llama(flash_attn=False) in gguf_agreement.py
p.cb_eval = hook
ctx = llama_cpp.llama_init_from_model(m, p)
batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
for i, t in enumerate(ids):  # every position outputs (the last layer keeps all rows)
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
    batch.seq_id[i][0] = 0
batch.n_tokens = len(ids)
assert llama_cpp.llama_decode(ctx, batch) == 0
np.savez(out, **saved)
"""
NAMES = "attn_norm,Qcur,Kcur,Vcur,kqv_out,ffn_inp,ffn_norm,ffn_moe_logits,ffn_moe_topk,l_out"


def llama_cpp_tensors(model: str, ids: list[int], threads: int) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "tensors.npz"
        ids_file.write_text(json.dumps(ids))
        subprocess.run([sys.executable, "-c", LLAMA_CPP, model, str(ids_file), str(out), str(threads), NAMES],
                       check=True, stderr=subprocess.DEVNULL)  # fmt: skip
        return dict(np.load(out))


def moepager_tensors(engine, ids: list[int]) -> dict[str, torch.Tensor]:
    """The same intermediates from moepager's forward, [T, ...] each, keyed by llama.cpp's names."""
    got, t = {}, len(ids)

    def out(name):
        return lambda mod, args, y: got.__setitem__(name, y.detach().float().reshape(t, -1).clone())

    def inp(name):
        return lambda mod, args: got.__setitem__(name, args[0].detach().float().reshape(t, -1).clone())

    for i, b in enumerate(engine.model.layers):
        b.attn_norm.register_forward_hook(out(f"attn_norm-{i}"))
        b.attn.q_proj.register_forward_hook(out(f"Qcur-{i}"))
        b.attn.k_proj.register_forward_hook(out(f"Kcur-{i}"))
        b.attn.v_proj.register_forward_hook(out(f"Vcur-{i}"))
        b.attn.o_proj.register_forward_pre_hook(inp(f"kqv_out-{i}"))
        b.ffn_norm.register_forward_pre_hook(inp(f"ffn_inp-{i}"))
        b.ffn_norm.register_forward_hook(out(f"ffn_norm-{i}"))
        b.ffn.router.register_forward_pre_hook(inp(f"router_in-{i}"))
        b.ffn.router.register_forward_hook(
            lambda m, a, y, i=i: got.__setitem__(f"ffn_moe_topk-{i}", y[1].clone())
        )
        b.register_forward_hook(out(f"l_out-{i}"))
    engine.logits([ids])
    for i, b in enumerate(engine.model.layers):
        got[f"ffn_moe_logits-{i}"] = F.linear(got.pop(f"router_in-{i}"), b.ffn.router.weight.float())
    return got


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """[T, D] -> its int8 values as ggml's quantize_row_q8_0 rounds them (blocks of 32, d = amax / 127)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    v = blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.sign(v) * torch.floor(v.abs() + 0.5)  # roundf: halves away from zero


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = moepager.load(args.model)
    ids = engine.tokenizer.encode(EVAL_TEXT.read_text())[: args.tokens]
    t, k = len(ids), engine.config.top_k
    with torch.inference_mode():
        ours = moepager_tensors(engine, ids)
    theirs = {n: torch.from_numpy(a) for n, a in llama_cpp_tensors(args.model, ids, args.threads).items()}

    def pair(name):
        return ours[name], theirs[name].float().reshape(t, -1)

    def rel(name) -> float:
        a, b = pair(name)
        return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max().item()

    print(f"{Path(args.model).name}, {t} positions. Layer 0, op by op:\n")
    print("| op (llama.cpp's name) | max relative difference | positions bit for bit equal |")
    print("| --- | --- | --- |")
    for name in (
        "attn_norm-0",
        "Qcur-0",
        "Kcur-0",
        "Vcur-0",
        "kqv_out-0",
        "ffn_inp-0",
        "ffn_norm-0",
        "l_out-0",
    ):
        a, b = pair(name)
        print(f"| {name} | {rel(name):.2e} | {int((a == b).all(-1).sum())} / {t} |")
    if not isinstance(engine.model.layers[0].attn.q_proj, torch.nn.Linear):  # a quantized projection
        a, b = pair("attn_norm-0")
        differ = q8_0(a) != q8_0(b)
        print(f"\nattn_norm-0 rounded to Q8_0 blocks: {int(differ.sum())} of {differ.numel()} int8 values differ, "
              f"at {int(differ.flatten(1).any(-1).sum())} positions")  # fmt: skip
    print()
    print("| layer | ffn_norm max relative difference | router logit max abs difference | median K/K+1 logit gap "
          "| positions whose K-th and K+1-th fp32 probabilities are equal (moepager) "
          "| positions routed to another top-K set (first time) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    parted = torch.zeros(t, dtype=torch.bool)
    for i in range(len(engine.model.layers)):
        lo, lt = pair(f"ffn_moe_logits-{i}")
        top = lo.sort(-1, descending=True).values
        gap = (top[:, k - 1] - top[:, k]).median().item()
        probs = (
            torch.softmax(lo, -1).sort(-1, descending=True).values
        )  # as both engines route: by probability
        ties = int((probs[:, k - 1] == probs[:, k]).sum())
        mine = ours[f"ffn_moe_topk-{i}"].reshape(t, k).sort(-1).values
        other = theirs[f"ffn_moe_topk-{i}"].long().reshape(t, k).sort(-1).values
        moved = (mine != other).any(-1)
        print(f"| {i} | {rel(f'ffn_norm-{i}'):.1e} | {(lo - lt).abs().max().item():.1e} | {gap:.1e} | {ties} "
              f"| {int(moved.sum())} ({int((moved & ~parted).sum())}) |", flush=True)  # fmt: skip
        parted |= moved
    print(f"\npositions routed to another top-K set in some layer: {int(parted.sum())} / {t}")


if __name__ == "__main__":
    main()
