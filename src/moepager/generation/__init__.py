"""Generation: tokens from a model, and text from tokens.

Owns prefill and the decode step (generate.py: generate_step yields token ids), sampling and logit processing
(sampling.py), constrained decoding (constrain.py), tool calls in text (tools.py, tool_stream.py), tokenizers
(tokenizer.py; gguf_tokenizer.py builds one from a GGUF's metadata), saved KV sessions (sessions.py),
continuous batching of many requests over one model (batching.py), and speculative decoding (speculate.py).

Imports the model, kernels, system and errors; never the sources, the store, the cache or the engine (the
engine's type is named for annotations only).
"""
