"""The engine: a model loaded with its experts, ready to generate, and what is measured and planned about it.

Owns `load()` (engine.py: opens the source, builds the model, swaps in resident, paged or distributed experts)
and its options as one typed object (options.py), the Engine with its KV caches and stats, `moepager plan`'s
prediction of a run (plan.py), and the stats line (summary.py).

Imports every part below it (model, generation, sources, store, paging, distributed, kernels, system); never
serving, the command line, moefy, synth, bench or training. The embedded default model is resolved above it,
by the public API and the command line.
"""
