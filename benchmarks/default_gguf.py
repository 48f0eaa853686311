"""The default model as GGUF files made by llama.cpp's own tools, for agreement with llama.cpp on a trained
model (benchmarks/quant_kernels.md): its converter (convert_hf_to_gguf.py, Qwen2-MoE -> llama.cpp's qwen2moe)
writes the f32 file and its quantizer (llama_model_quantize, in llama-cpp-python) the Q8_0, Q4_0 and Q4_K_M
files. Usage:

    python benchmarks/default_gguf.py LLAMA_CPP_DIR OUT_DIR [--router-scale S]

LLAMA_CPP_DIR is a llama.cpp source tree (llama-cpp-python's sdist vendors one: vendor/llama.cpp); only its
converter and gguf-py are used. The default model ties its output head to the embedding, and llama.cpp's
qwen2moe requires an output.weight, so the converter reads a copy of the checkpoint that holds lm_head.weight
(the embedding's copy) and says tie_word_embeddings=false; the weights are the default model's, unchanged. --router-scale multiplies every router weight by S (a power of two keeps
the ranking exact): a what-if for the router's spread, not the default model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

QUANTIZE = """
import sys
import llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p) == 0, dst
"""
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def untied_copy(model: Path, to: Path, router_scale: float) -> Path:
    """`to`: the checkpoint with lm_head.weight (a copy of the embedding) and tie_word_embeddings=false, its
    routers scaled by router_scale, its other files linked."""
    from safetensors.torch import load_file, save_file

    to.mkdir()
    for f in model.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            os.symlink(f, to / f.name)
    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    for name in weights:
        if name.endswith("mlp.gate.weight"):
            weights[name] = weights[name] * router_scale
    save_file(weights, str(to / "model.safetensors"), {"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    return to


def main() -> None:
    from moepager.moefy.default_model import default_model_path

    p = argparse.ArgumentParser()
    p.add_argument(
        "llama_cpp", type=Path, help="a llama.cpp source tree (its convert_hf_to_gguf.py, gguf-py)"
    )
    p.add_argument("out", type=Path)
    p.add_argument("--router-scale", type=float, default=1.0)
    p.add_argument("--name", default="default")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f32 = args.out / f"{args.name}.f32.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        folder = untied_copy(default_model_path(), Path(tmp) / "model", args.router_scale)
        env = {**os.environ, "PYTHONPATH": str(args.llama_cpp / "gguf-py")}
        cmd = [sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
               "--outfile", str(f32)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    print(f32, flush=True)
    for kind, ftype in FTYPES.items():  # in its own process: llama-cpp-python's libggml is not moepager's
        dst = args.out / f"{args.name}.{kind}.gguf"
        subprocess.run([sys.executable, "-c", QUANTIZE, str(f32), str(dst), str(ftype)], check=True,
                       capture_output=True)  # fmt: skip
        print(dst, flush=True)


if __name__ == "__main__":
    main()
