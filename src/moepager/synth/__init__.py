"""Synthetic models for tests and benchmarks: random checkpoints of any family and size (checkpoint.py), and
GGUF files written directly in llama.cpp's block formats at real models' shapes (gguf.py, shapes.py).

Imports the model's config, kernels, system, errors and moefy's default model (its tokenizer); imported by
bench and the command line.
"""
