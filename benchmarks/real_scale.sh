#!/usr/bin/env bash
# moepager against llama.cpp (llama-cpp-python 0.3.36) at real scale: a 17 GB Q4_K_M GGUF at
# Qwen3-30B-A3B's shape (48 layers, 128 experts of 768, top-8), written by `moepager synth --format gguf`.
# Resident (cap: the file plus 2 GiB), and under 8 GiB and 4 GiB cgroup caps that count the page cache, where
# moepager runs with --memory-limit at the cap and llama.cpp at each of its settings (weights repacked, plain
# mmap, lazy expert loading). Alternating rounds, caches dropped before each run, seeded sampling
# (temperature 1). Results: benchmarks/results/real-scale-*.{md,json,png}.
set -euo pipefail
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
