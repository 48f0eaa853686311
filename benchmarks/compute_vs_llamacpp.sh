#!/usr/bin/env bash
# The compute issue's measurements, in one run: moepager against llama.cpp (llama-cpp-python 0.3.36) on the
# same models, under the same cgroup caps, alternating, caches dropped, sampled decoding (temperature 1,
# seed 0). Models: benchmarks/README.md, "Compute: moepager against llama.cpp" says how they were made.
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
D=${BENCHDATA:-/work/benchdata}
OUT=${OUT:-benchmarks/results}
COMMON=(--rounds 2 --tokens 33 --prompt-tokens 16 --peers llamacpp --out "$OUT")
# Qwen3-MoE shape (D=512, 64 experts of 320, top-4, 8 layers), fp32, every expert resident
moepager bench "$D/qwen3-64x4" --gguf "$D/qwen3-64x4.f32.gguf" --budgets 100% "${COMMON[@]}" \
  --name qwen3-64x4-f32-resident
# the same fp32 model as its f32 GGUF, both engines on that file (moepager computes it with ggml, as llama.cpp does)
moepager bench "$D/qwen3-64x4.f32.gguf" --budgets 100% --rounds 2 --tokens 129 --prompt-tokens 16 --peers llamacpp \
  --overhead 2GiB --out "$OUT" --name qwen3-64x4-f32-gguf-resident-active
# the same model as llama.cpp's Q4_0 file, both engines on that file: every expert resident (cap auto),
# and a cap of about the file's size plus the runtime
moepager bench "$D/qwen3-64x4.q4_0.gguf" --tokenizer "$D/qwen3-64x4" --budgets 100% "${COMMON[@]}" \
  --overhead 512MiB --name qwen3-64x4-q4_0
moepager bench "$D/qwen3-64x4.q4_0.gguf" --tokenizer "$D/qwen3-64x4" --budgets 100%,25% "${COMMON[@]}" \
  --memory-cap 560MiB --name qwen3-64x4-q4_0-cap560
# larger experts, where the matrix math matters: D=2048, 128 experts of 768, top-8, 2 layers
moepager bench "$D/qwen3-128x8" --gguf "$D/qwen3-128x8.f32.gguf" --budgets 100%,25% "${COMMON[@]}" \
  --tokens 17 --name qwen3-128x8-f32
moepager bench "$D/qwen3-128x8.q4_0.gguf" --tokenizer "$D/qwen3-128x8" --budgets 100% "${COMMON[@]}" \
  --tokens 17 --overhead 512MiB --name qwen3-128x8-q4_0
# paged fp32 with tight caps (512 MiB over the dense weights and the budget, for every engine): with the
# default 1 GiB overhead the whole 1.2 GiB model fits llama.cpp's page cache at every budget
moepager bench "$D/qwen3-64x4" --gguf "$D/qwen3-64x4.f32.gguf" --budgets 25%,5% "${COMMON[@]}" \
  --overhead 512MiB --name qwen3-64x4-f32-tight
# the default model (32 experts of 24 neurons, top-26): every expert resident, and a quarter paged
moepager bench "$(python -c 'from moepager.moefy.default_model import default_model_path as p; print(p())')" \
  --budgets 25% --rounds 2 --tokens 17 --prompt-tokens 32 --peers none --overhead 768MiB --out "$OUT" \
  --name default-smollm2-moe-compute
# torch ops per decoded token, every expert resident (TorchFunctionMode)
python benchmarks/count_ops.py "$(python -c 'from moepager.moefy.default_model import default_model_path as p; print(p())')" \
  "$D/mixtral-small" "$D/qwen3-64x4" --tokens 16 | tee "$OUT/ops_after.txt"
