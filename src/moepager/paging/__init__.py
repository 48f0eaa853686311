"""Expert paging: the byte-budgeted cache of expert slots (cache.py), the experts contract over it (paged.py),
eviction policies (policies.py), prefetch (prefetch.py), and routing traces with their offline replay (trace.py)."""
