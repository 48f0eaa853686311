"""The model: one decoder for every family, built from its config, with experts swapped in after.

Owns the architecture facts read from config.json (config.py), the layers (norms, RoPE, attention), routing and
the experts contract with its one primitive per layer (moe.py), the decoder (decoder.py), the KV cache
(kvcache.py) and compact dense layers (compact.py).

Imports only kernels, system and errors. It never imports the store, the sources or the cache: paged experts
are another implementation of the experts contract, set on the model by whoever builds it.
"""
