"""The process and its files: what every part below the engine needs from the operating system.

Owns reading byte ranges without the page cache (direct_reader.py: O_DIRECT into reused aligned buffers),
safetensors headers and tensors by byte range (safetensors.py), durable writes (durable.py: fsync, atomic
rename, holes), checks of output paths, sizes as people write them, progress bars, and the process's resident
memory (process_memory.py).

Imports nothing of moepager but errors.py: every other part may import this one.
"""
