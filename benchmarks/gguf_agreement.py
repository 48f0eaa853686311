"""Teacher-forced agreement between moepager and llama.cpp on the same GGUF file: over the tokens of a text,
each position's next-token argmax and logits from both engines (so every position counts, not just the few a
greedy loop visits before it repeats itself). llama.cpp runs in its own process (llama-cpp-python ships its own
libggml under the same soname as the libggml-python wheel moepager computes with, so the two cannot share a
process), with an f32 KV cache (its default f16 cache alone moves logits by ~0.08). Beside it, llama.cpp against
itself: the same positions evaluated one token at a time (as it decodes) instead of in one batch, the floor
that float summation order alone sets on these files. Usage:

    python benchmarks/gguf_agreement.py MODEL.gguf [MODEL.gguf ...] [--tokens 256] [--threads 2]
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

import moepager
from moepager.data import __file__ as data_init

LLAMA_CPP = """
import json, sys
import numpy as np
import llama_cpp
model, ids_file, out, threads, batch = sys.argv[1:6]
ids = json.load(open(ids_file))
llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids) + 8, logits_all=True, type_k=0, type_v=0,
                      n_batch=int(batch), n_ubatch=int(batch), n_threads=int(threads),
                      n_threads_batch=int(threads), verbose=False)
llm.eval(ids)
np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))
"""


def llama_cpp_logits(model: str, ids: list[int], threads: int, batch: int) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids_file.write_text(json.dumps(ids))
        subprocess.run(
            [sys.executable, "-c", LLAMA_CPP, model, str(ids_file), str(out), str(threads), str(batch)],
            check=True,
        )
        return torch.from_numpy(np.load(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    text = (Path(data_init).parent / "eval_gpl3.txt").read_text()
    print(
        "| file | positions | argmax agreement with llama.cpp | max abs logit difference | logit scale "
        "| llama.cpp batched against its own token-by-token: agreement | max abs logit difference |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        torch.set_num_threads(args.threads)
        engine = moepager.load(model)
        ids = engine.tokenizer.encode(text)[: args.tokens]
        ours = engine.logits([ids])[0]  # [T, V]
        del engine
        theirs = llama_cpp_logits(model, ids, args.threads, batch=len(ids))
        stepwise = llama_cpp_logits(model, ids, args.threads, batch=1)

        def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
            return f"{(a.argmax(-1) == b.argmax(-1)).float().mean().item():.3f} | {(a - b).abs().max().item():.2e}"

        print(f"| {Path(model).name} | {len(ids)} | {agreement(ours, theirs)} | {theirs.abs().max().item():.2f} "
              f"| {agreement(theirs, stepwise)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
