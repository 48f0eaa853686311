"""Teacher-forced agreement between moepager and llama.cpp on the same GGUF file: over the tokens of a text,
each position's next-token argmax and logits from both engines (so every position counts, not just the few a
greedy loop visits before it repeats itself). llama.cpp runs in its own process with an f32 KV cache (its
default f16 cache alone moves logits by ~0.08) and without flash attention, twice: as it runs by default, with
its weights repacked (use_extra_bufts: on x86, Q4_0, Q4_K and IQ4_NL rows interleaved 8 by 8, whose kernels
sum in another order), and without repacking; moepager computes on the same layout as llama.cpp by default, and
on the file's rows with MOEPAGER_REPACK=0 (kernels/ggml_repack.py). Both engines also run the positions one
token at a time through their KV caches, as they decode. The first line names the libggml moepager computed
with (kernels/ggml_library.py: llama-cpp-python's own when it is installed). Usage:

    python benchmarks/gguf_agreement.py MODEL.gguf [MODEL.gguf ...] [--tokens 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import moepager
from moepager.data import __file__ as data_init
from moepager.kernels import ggml_library, ggml_repack
from moepager.model.layers import KVCache

# llama-cpp-python's low-level API: Llama() does not take use_extra_bufts
LLAMA_CPP = """
import json, sys
import numpy as np
import llama_cpp
model, ids_file, out, threads, batch, repack = sys.argv[1:7]
ids, batch = json.load(open(ids_file)), int(batch)
llama_cpp.llama_backend_init()
mp = llama_cpp.llama_model_default_params()
mp.use_extra_bufts = repack == "1"
m = llama_cpp.llama_model_load_from_file(model.encode(), mp)
p = llama_cpp.llama_context_default_params()
p.n_ctx, p.n_batch, p.n_ubatch = len(ids) + 8, batch, batch
p.n_threads = p.n_threads_batch = int(threads)
p.type_k = p.type_v = 0  # f32 KV cache
p.flash_attn_type = 0  # off
ctx = llama_cpp.llama_init_from_model(m, p)
vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
rows = []
for first in range(0, len(ids), batch):
    chunk = ids[first : first + batch]
    b = llama_cpp.llama_batch_init(len(chunk), 0, 1)
    for i, t in enumerate(chunk):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, first + i, 1, 1
        b.seq_id[i][0] = 0
    b.n_tokens = len(chunk)
    assert llama_cpp.llama_decode(ctx, b) == 0
    rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(chunk), vocab)).copy())
    llama_cpp.llama_batch_free(b)
np.save(out, np.concatenate(rows))
"""


def llama_cpp_logits(model: str, ids: list[int], threads: int, batch: int, repack: bool) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids_file.write_text(json.dumps(ids))
        args = [model, str(ids_file), str(out), str(threads), str(batch), str(int(repack))]
        subprocess.run([sys.executable, "-c", LLAMA_CPP, *args], check=True, stderr=subprocess.DEVNULL)
        return torch.from_numpy(np.load(out))


def moepager_logits(model: str, ids: list[int], repack: bool, stepwise: bool = False) -> torch.Tensor:
    """[T, V]: one batch, or (stepwise) one token at a time through the KV cache, as moepager decodes."""
    os.environ[ggml_repack.REPACK_ENV] = str(int(repack))
    engine = moepager.load(model)
    if not stepwise:
        return engine.logits([ids])[0]
    cache = KVCache(engine.config.num_layers)
    with torch.no_grad():
        return torch.stack([engine.model(torch.tensor([[t]]), cache=cache)[0, -1].float() for t in ids])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    text = (Path(data_init).parent / "eval_gpl3.txt").read_text()
    print(f"moepager computes with {ggml_library.library().describe()}")
    print(
        "| file | positions | moepager against llama.cpp, both by default (repacked): argmax agreement | logits "
        "bit for bit | max abs difference | token by token, both: agreement | bit for bit "
        "| MOEPAGER_REPACK=0 against llama.cpp not repacked: agreement | bit for bit "
        "| llama.cpp repacked against not: agreement | max abs difference |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        torch.set_num_threads(args.threads)
        ids = moepager.load(model).tokenizer.encode(text)[: args.tokens]
        ours = moepager_logits(model, ids, repack=True)
        ours_stepwise = moepager_logits(model, ids, repack=True, stepwise=True)
        ours_plain = moepager_logits(model, ids, repack=False)
        repacked = llama_cpp_logits(model, ids, args.threads, len(ids), repack=True)
        stepwise = llama_cpp_logits(model, ids, args.threads, 1, repack=True)
        plain = llama_cpp_logits(model, ids, args.threads, len(ids), repack=False)

        def agreement(a: torch.Tensor, b: torch.Tensor, exact: bool = True, spread: bool = True) -> str:
            same = f"{(a.argmax(-1) == b.argmax(-1)).float().mean().item():.3f}"
            bits = f" | {(a == b).all(-1).sum().item()}/{len(a)}" if exact else ""
            return same + bits + (f" | {(a - b).abs().max().item():.2e}" if spread else "")

        print(f"| {Path(model).name} | {len(ids)} | {agreement(ours, repacked)} "
              f"| {agreement(ours_stepwise, stepwise, spread=False)} | {agreement(ours_plain, plain, spread=False)} "
              f"| {agreement(repacked, plain, exact=False)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
