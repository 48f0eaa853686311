"""Compute kernels for expert banks: float32 (matvec.py, numba), int8/int4 (intquant.py, torch) and GGUF
block formats (ggml.py, llama.cpp's own kernels), with banks.py holding each format's products.

Imports only system and errors: the model computes through these, and nothing here knows a model."""
