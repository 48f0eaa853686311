"""Expert parallelism across processes and machines: a model's routed experts partitioned over Ray actors.

placement.py decides which actor holds which expert; shard.py is what an actor runs (its experts, resident
or paged, computed with the same banks and kernels as one process); ray_experts.py is the driver's side, an
implementation of the experts contract that sends each layer's routed tokens to the owning actors. Only
ray_experts.py imports Ray (the optional extra `moepager[ray]`).

Imports paging, the store (an actor opens the model itself), the sources, the model, kernels, system and errors;
never the engine or anything above.
"""
