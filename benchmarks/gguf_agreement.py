"""Greedy next-token agreement between moepager and llama.cpp on the same GGUF file (teacher-forced over a
text, so every position counts, not just the few a greedy loop visits before it repeats itself), and the
largest logit difference between moepager's compact blocks and the file dequantized to fp32 (its exact
reference). Usage:

    python benchmarks/gguf_agreement.py MODEL.gguf --tokenizer FOLDER [--tokens 256]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import moepager
from moepager.data import __file__ as data_init
from moepager.store.gguf_source import GgufSource
from moepager.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument(
        "--tokenizer", required=True, help="folder with the tokenizer.json of the model's vocabulary"
    )
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    from pathlib import Path

    import llama_cpp

    text = (Path(data_init).parent / "eval_gpl3.txt").read_text()
    ids = Tokenizer(Path(args.tokenizer)).encode(text)[: args.tokens]
    compact = moepager.load(args.model).logits([ids])[0]  # [T, V]
    exact = moepager.load(GgufSource(args.model, compact=False)).logits([ids])[0]
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=len(ids) + 8, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))  # [T, V]
    agree = (compact.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    agree_exact = (compact.argmax(-1) == exact.argmax(-1)).float().mean().item()
    print(f"{args.model}: {len(ids)} positions of eval_gpl3.txt")
    print(f"  greedy agreement with llama.cpp: {agree:.3f}")
    print(f"  greedy agreement with the dequantized fp32 model: {agree_exact:.3f}, "
          f"max |logit difference| {(compact - exact).abs().max().item():.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
