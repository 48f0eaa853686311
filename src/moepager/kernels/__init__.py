"""Compute kernels for expert banks: float, int8/int4 and GGUF block formats."""
