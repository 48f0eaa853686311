"""moefy: turn a dense llama-family model into a Mixture-of-Experts checkpoint.

gguf_dense.py  a dense llama GGUF file -> a Hugging Face llama folder (weights, tokenizer, chat template)
build.py       calibration (neuron clustering, routers) -> a "plan"; the plan + dense weights -> Qwen2-MoE;
               the design and why K = E reproduces the dense model are in its docstring
default_model.py  the embedded default model: SmolLM2 carved by a shipped plan, built on first use

Imports the engine (calibration runs the dense model) and everything below it; imported by the public API,
synth, bench and the command line.
"""
