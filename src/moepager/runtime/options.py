"""Every option of `load()` in one typed object, grouped by the part it configures.

The command line, the server and the Python API build an EngineOptions in one place each (the CLI:
cli/model_options.py `engine_options`; the API: `load(model, **options)`, the short form, through
`EngineOptions.of`), and `load()` reads it; nothing below the engine sees these options, only the objects
they configure. Sizes stay as people wrote them ("512MiB", "25%") until the part that knows the total reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class PagingOptions:
    """Paging experts from disk: any of expert_memory, memory_limit, pins or hot_set turns it on."""

    expert_memory: int | str | None = None  # bytes for routed experts ("512MiB", 1234) or a share ("25%")
    memory_limit: int | str | None = None  # a whole-process budget; the experts get what the rest leaves
    policy: str | object | None = None  # eviction policy: lru, lfu, nextuse (the default) or an object
    # read the next layer's likely experts ahead (None: where a GPU computes; on the CPU the compute takes every
    # core, and reads made ahead took more from it than they saved: benchmarks/real_scale.md, "Fill at load, prefetch off on the CPU")
    prefetch: bool | None = None
    fill: bool | None = None  # read experts into the whole expert cache at load (None: under memory_limit)
    pins: tuple[tuple[int, int], ...] = ()  # (layer, expert) pairs never evicted
    hot_set: str | Path | None = None  # a file of (layer, expert) pairs to pin
    max_context: int | None = None  # the context memory_limit plans the KV cache for (default 4096)
    record_trace: bool = False  # keep each step's routing in engine.trace

    @property
    def enabled(self) -> bool:
        return (
            self.expert_memory is not None
            or self.memory_limit is not None
            or bool(self.pins)
            or (self.hot_set is not None)
        )


@dataclass(frozen=True)
class KVSettings:
    """The KV cache: at most kv_memory of it in RAM, in blocks of kv_block_size positions, older blocks spilled
    to a file in kv_spill_dir; prefill_chunk bounds the prompt tokens per forward pass (None: 512, or under a
    memory_limit the chunk whose activations its buffers hold)."""

    kv_memory: int | str | None = None  # None: all in RAM
    kv_block_size: int = 256
    kv_spill_dir: str | None = None  # None: the system's temporary folder
    prefill_chunk: int | None = None


@dataclass(frozen=True)
class QuantOptions:
    """experts_dtype: bf16, fp16, int8 or int4 converts routed experts as they are read (int8/int4 are lossy:
    measure with `moepager eval`); None keeps the source's own experts."""

    experts_dtype: str | None = None


@dataclass(frozen=True)
class DistributedOptions:
    """Routed experts spread over Ray actors (distributed/ray_experts.py); expert_memory is each actor's."""

    ray: str | None = None  # a cluster address: "auto", "127.0.0.1:6379", "local"; None: one process
    ray_actors: int | None = None  # default: one per node
    ray_placement: str | None = None  # a routing trace to place experts by usage; None: round-robin
    ray_replicate: int = 0  # hottest experts per layer held by two actors


@dataclass(frozen=True)
class SpeculationOptions:
    """Draft tokens verified in one forward (generation/speculate.py); the output is unchanged."""

    speculate: str | None = None  # "ngram", "self" or a draft model with the same tokenizer; None: no drafts
    draft_tokens: int = 4


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"  # cpu or cuda[:N]
    dtype: str | object | None = None  # float32, bfloat16, float16 (or a torch.dtype); None: the checkpoint's
    paging: PagingOptions = field(default_factory=PagingOptions)
    kv: KVSettings = field(default_factory=KVSettings)
    quant: QuantOptions = field(default_factory=QuantOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)
    speculation: SpeculationOptions = field(default_factory=SpeculationOptions)

    @classmethod
    def of(cls, base: EngineOptions | None = None, **flat) -> EngineOptions:
        """`base` (default: the defaults) with options given by their flat names, as `load(model, **options)`
        takes them: expert_memory=..., kv_memory=..., ray=..., speculate=... Unknown names are refused."""
        out = base or cls()
        unknown = set(flat) - set(_GROUP_OF) - {"device", "dtype"}
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        top = {k: flat.pop(k) for k in ("device", "dtype") if k in flat}
        groups: dict[str, dict] = {}
        for name, value in flat.items():
            groups.setdefault(_GROUP_OF[name], {})[name] = value
        if "pins" in groups.get("paging", {}):
            groups["paging"]["pins"] = tuple(tuple(p) for p in groups["paging"]["pins"])
        return replace(out, **top, **{g: replace(getattr(out, g), **kv) for g, kv in groups.items()})


_GROUP_OF = {
    f.name: group.name
    for group in fields(EngineOptions)
    if group.name not in ("device", "dtype")
    for f in fields(group.default_factory)
}
