#!/usr/bin/env bash
# moepager against llama.cpp (llama-cpp-python 0.3.36) at real scale: a 17 GB Q4_K_M GGUF at
# Qwen3-30B-A3B's shape (48 layers, 128 experts of 768, top-8), written by `moepager synth --format gguf`.
# Resident (cap: the file plus 2 GiB), and under 8 GiB and 4 GiB cgroup caps that count the page cache, where
# moepager runs with --memory-limit at the cap and llama.cpp at each of its settings (weights repacked, plain
# mmap, lazy expert loading). Alternating rounds, caches dropped before each run, seeded sampling
# (temperature 1). Results: benchmarks/results/real-scale-*.{md,json,png}.
set -euo pipefail
# a quiet machine: OpenMP threads may spin (benchmarks/README.md, "OpenMP"). llama.cpp-python's libggml uses OpenMP
# barriers between a graph's nodes, which the harness's default PASSIVE puts to sleep: llama.cpp's best setting is
# ACTIVE (small file 270 against 82 tok/s). OMP_WAIT_POLICY=PASSIVE bash ... gives the other (real_scale.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-ACTIVE}
D=${BENCHDATA:-/work/benchdata}
OUT=${OUT:-benchmarks/results}
MODEL="$D/qwen3-30b-a3b.q4_k_m.gguf"
[ -f "$MODEL" ] || moepager synth "$MODEL" --format gguf --shape qwen3-30b-a3b --quant Q4_K_M
COMMON=(--rounds "${ROUNDS:-1}" --tokens "${TOKENS:-17}" --prompt-tokens 16 --out "$OUT" --timeout 2400)
moepager bench "$MODEL" --budgets 100% --peers llamacpp,llamacpp-norepack --overhead 2GiB "${COMMON[@]}" \
  --name real-scale-resident
moepager bench "$MODEL" --budgets limit --memory-cap 8GiB --peers llamacpp-norepack,llamacpp-lazy \
  "${COMMON[@]}" --name real-scale-8gib
moepager bench "$MODEL" --budgets limit --memory-cap 4GiB --peers llamacpp-norepack,llamacpp-lazy \
  "${COMMON[@]}" --name real-scale-4gib
# the small Qwen3-MoE shape (D=512, 8 layers, 64 experts of 320, top-4) as a 182 MiB Q4_0 file: resident, and
# under a 400 MiB cap, where moepager runs with --memory-limit 400MiB and decides what stays resident
# (129 tokens: at 33, a run of ~0.1 s was mostly its first graph builds and thread-count probe)
SMALL="$D/qwen3-64x4.q4_0.gguf"
[ -f "$SMALL" ] || moepager synth "$SMALL" --format gguf --shape qwen3-64x4 --quant Q4_0
moepager bench "$SMALL" --budgets 100% --peers llamacpp,llamacpp-norepack --overhead 512MiB \
  --rounds "${ROUNDS:-1}" --tokens 129 --prompt-tokens 16 --out "$OUT" --name small-q4_0-resident
moepager bench "$SMALL" --budgets limit --memory-cap 400MiB --peers llamacpp-norepack,llamacpp-lazy \
  --rounds "${ROUNDS:-1}" --tokens 129 --prompt-tokens 16 --out "$OUT" --name small-q4_0-400mib
# GPT_OSS=1: the same resident and 8 GiB runs at GPT-OSS-20B's shape (llama.cpp's gpt-oss, experts MXFP4, the
# rest Q8_0: an 11.2 GB file)
if [ "${GPT_OSS:-0}" = 1 ]; then
  OSS="$D/gpt-oss-20b.q8_0.gguf"
  [ -f "$OSS" ] || moepager synth "$OSS" --format gguf --shape gpt-oss-20b --quant Q8_0
  moepager bench "$OSS" --budgets 100% --peers llamacpp,llamacpp-norepack --overhead 2GiB "${COMMON[@]}" \
    --name real-scale-gpt-oss-resident
  moepager bench "$OSS" --budgets limit --memory-cap 8GiB --peers llamacpp-norepack,llamacpp-lazy \
    "${COMMON[@]}" --name real-scale-gpt-oss-8gib
fi
# DEEPSEEK=1: the same resident, 8 GiB and 4 GiB runs at DeepSeek-V2-Lite's shape (llama.cpp's deepseek2: MLA,
# layer 0 dense, 64 experts of 1408 + 2 shared, softmax top-6; a 10.2 GB file)
if [ "${DEEPSEEK:-0}" = 1 ]; then
  LITE="$D/deepseek-v2-lite.q4_k_m.gguf"
  [ -f "$LITE" ] || moepager synth "$LITE" --format gguf --shape deepseek-v2-lite --quant Q4_K_M
  moepager bench "$LITE" --budgets 100% --peers llamacpp,llamacpp-norepack --overhead 2GiB "${COMMON[@]}" \
    --name real-scale-deepseek-v2-lite-resident
  moepager bench "$LITE" --budgets limit --memory-cap 8GiB --peers llamacpp-norepack,llamacpp-lazy \
    "${COMMON[@]}" --name real-scale-deepseek-v2-lite-8gib
  moepager bench "$LITE" --budgets limit --memory-cap 4GiB --peers llamacpp-norepack,llamacpp-lazy \
    "${COMMON[@]}" --name real-scale-deepseek-v2-lite-4gib
fi
