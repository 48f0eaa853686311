"""Expert paging: the byte-budgeted cache of expert slots (cache.py; where an expert is evicted: the policy it
asks, policies.py), the experts contract over it (paged.py), prefetch (prefetch.py), and routing traces with
their offline replay (trace.py) and the cold-start fill model `plan` uses (fill.py).

Imports the sources (an expert is read through the ModelSource contract), the store's encodings, the model's
contract and types, kernels, system and errors; never the engine or anything above."""
