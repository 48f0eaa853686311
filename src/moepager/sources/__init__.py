"""Sources: where a model's weights come from, each read in place, with routed experts readable one at a time.

Owns the ModelSource contract (contract.py), Hugging Face checkpoints and their one tensor-name table
(checkpoint.py), GGUF files and llama.cpp's names (gguf.py), a hub model fetched expert by expert (hub.py over
hub_ranges.py, kept in a local tier: local_tier.py), ollama's store (ollama.py), naming a model (resolve.py),
and the models already on this machine (catalog.py). The expert-aligned store is a source too, but lives in
store/, which is made from these.

Imports the model's types, generation's tokenizers, kernels, system and errors; never the store, paging, the
engine or anything above.
"""
