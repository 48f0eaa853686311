"""Compute kernels for expert banks: float32 (matvec.py, numba), int8/int4 (intquant.py, torch) and GGUF
block formats (ggml.py, llama.cpp's own kernels)."""
