"""ModelConfig: the architecture facts of a checkpoint, read from its config.json.

Owns the translation of each family's config.json into one set of fields, so the decoder never asks which
family it runs. Runtime choices (memory budgets, device, policies) are not here: they belong to the objects
that use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedArchitecture


@dataclass
class ModelConfig:
    family: str  # the checkpoint's model_type, e.g. "mixtral"
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    norm: str = "rms"  # "rms" or "layer" (LayerNorm with bias, PhiMoE)
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    # attention
    attention: str = "gqa"  # "gqa" or "mla" (DeepSeek multi-head latent attention)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none", "head" (per head, Qwen3) or "full" (whole projection, OLMoE)
    clip_qkv: float | None = None
    attention_sinks: bool = False  # a learned per-head logit in the softmax denominator (GPT-OSS)
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer; None = full attention
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta and that type's parameters
    rope_dim: int = 0  # rotated dims per head (MLA: qk_rope_head_dim)
    rope_interleave: bool = False  # rotate (x0, x1), (x2, x3) pairs instead of halves (DeepSeek)
    # MLA only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    # feed-forward
    intermediate_size: int = 0  # dense MLP layers
    moe_layers: list[bool] = field(default_factory=list)  # per layer: routed experts or a dense MLP
    num_experts: int = 0  # E
    top_k: int = 0  # K
    moe_intermediate_size: int = 0  # I of one routed expert
    routing: str = "softmax_topk"  # see moe.route
    # whose float order decides near-tied softmax routing: "torch" (transformers, a checkpoint's reference) or
    # "llama.cpp" (ggml's softmax and std::sort, a GGUF file's reference; kernels/ggml_routing.py)
    routing_order: str = "torch"
    norm_topk_prob: bool = False
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    # how a group of experts is scored when routing picks groups first: "top2_sum" (DeepSeek-V3, and llama.cpp
    # for every deepseek2 file) or "max" (DeepSeek-V2's group_limited_greedy)
    group_score: str = "top2_sum"
    routed_scaling_factor: float = 1.0
    router_jitter_eps: float = 0.0  # sparsemixer's threshold (PhiMoE)
    expert_act: str = "swiglu"  # "swiglu" or "gptoss" (clamped SwiGLU with biases)
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert_size: int = 0  # intermediate size of the always-on shared expert; 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(gate(x))
    # per MoE layer, expert ids its router never picks: removed or disabled in an edited store, or padding
    # where another layer grew (the manifest's absent_experts; empty for any checkpoint)
    absent_experts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def grouped_routing(self) -> bool:
        """DeepSeek's routing: experts picked within the best groups, from router logits computed in fp32."""
        return self.routing in ("sigmoid_group", "softmax_group")

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


def _get(d: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def _rope(d: dict) -> dict[str, Any]:
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def _eos(d: dict) -> list[int]:
    eos = d.get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _windows(d: dict, n: int) -> list[int | None]:
    window = d.get("sliding_window")
    if d.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in d["layer_types"]]
    if window and d.get("use_sliding_window", True):
        return [window] * n
    return [None] * n


def _base(d: dict) -> dict[str, Any]:
    n = d["num_hidden_layers"]
    heads = d["num_attention_heads"]
    return dict(
        family=d["model_type"],
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=n,
        num_heads=heads,
        num_kv_heads=_get(d, "num_key_value_heads", default=heads),
        head_dim=_get(d, "head_dim", default=d["hidden_size"] // heads),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        norm_eps=_get(d, "rms_norm_eps", "layer_norm_eps", default=1e-6),
        tie_embeddings=d.get("tie_word_embeddings", False),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos(d),
        rope=_rope(d),
        sliding_windows=_windows(d, n),
        intermediate_size=d.get("intermediate_size", 0),
    )


def _sparse_layers(d: dict, num_experts: int) -> list[bool]:
    """Qwen-style: MoE every decoder_sparse_step layers, except mlp_only_layers."""
    step = d.get("decoder_sparse_step", 1) or 1
    dense = set(d.get("mlp_only_layers") or [])
    return [i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(d["num_hidden_layers"])]


def _llama(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.qkv_bias = c.o_bias = d.get("attention_bias", False)
    c.moe_layers = [False] * c.num_layers
    return c


def _mixtral(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.num_experts = d["num_local_experts"]
    c.top_k = d["num_experts_per_tok"]
    c.moe_intermediate_size = d["intermediate_size"]
    c.norm_topk_prob = True
    c.moe_layers = [True] * c.num_layers
    return c


def _qwen2_moe(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.qkv_bias = d.get("qkv_bias", True)
    c.num_experts = _get(d, "num_experts", "num_local_experts")
    c.top_k = d["num_experts_per_tok"]
    c.moe_intermediate_size = d["moe_intermediate_size"]
    c.norm_topk_prob = d.get("norm_topk_prob", False)
    c.shared_expert_size = d.get("shared_expert_intermediate_size", 0)
    c.shared_expert_gate = c.shared_expert_size > 0
    c.moe_layers = _sparse_layers(d, c.num_experts)
    return c


def _qwen3_moe(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.qkv_bias = c.o_bias = d.get("attention_bias", False)
    c.qk_norm = "head"
    c.num_experts = _get(d, "num_experts", "num_local_experts")
    c.top_k = d["num_experts_per_tok"]
    c.moe_intermediate_size = d["moe_intermediate_size"]
    c.norm_topk_prob = d.get("norm_topk_prob", False)
    c.moe_layers = _sparse_layers(d, c.num_experts)
    return c


def _olmoe(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.qkv_bias = c.o_bias = d.get("attention_bias", False)
    c.qk_norm = "full"
    c.clip_qkv = d.get("clip_qkv")
    c.num_experts = d["num_experts"]
    c.top_k = d["num_experts_per_tok"]
    c.moe_intermediate_size = d["intermediate_size"]
    c.norm_topk_prob = d.get("norm_topk_prob", False)
    c.moe_layers = [True] * c.num_layers
    return c


def _deepseek_v3(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.attention = "mla"
    c.qkv_bias = c.o_bias = d.get("attention_bias", False)
    c.q_lora_rank = d.get("q_lora_rank")
    c.kv_lora_rank = d["kv_lora_rank"]
    c.qk_nope_head_dim = d["qk_nope_head_dim"]
    c.rope_dim = d["qk_rope_head_dim"]
    c.v_head_dim = d["v_head_dim"]
    c.head_dim = c.qk_nope_head_dim + c.rope_dim
    c.num_kv_heads = c.num_heads  # MLA expands the latent to every head
    c.rope_interleave = d.get("rope_interleave", True)
    c.num_experts = _get(d, "n_routed_experts", "num_local_experts")
    c.top_k = d["num_experts_per_tok"]
    c.moe_intermediate_size = d["moe_intermediate_size"]
    c.routing = "sigmoid_group"
    c.norm_topk_prob = d.get("norm_topk_prob", True)
    c.n_group = d.get("n_group", 1) or 1
    c.topk_group = d.get("topk_group", 1) or 1
    c.routed_scaling_factor = d.get("routed_scaling_factor", 1.0)
    c.shared_expert_size = c.moe_intermediate_size * (d.get("n_shared_experts") or 0)
    first_dense = d.get("first_k_dense_replace", 0)
    step = d.get("moe_layer_freq", 1) or 1
    c.moe_layers = [i >= first_dense and i % step == 0 for i in range(c.num_layers)]
    return c


def _deepseek_v2(d: dict) -> ModelConfig:
    """DeepSeek-V2 (and -Lite): V3's attention and layers, routed by a softmax; greedy top-k, or top-k within
    the best groups by their largest score (group_limited_greedy)."""
    c = _deepseek_v3(d)
    c.routing = "softmax_group"
    c.norm_topk_prob = False  # the reference (transformers' DeepseekV2TopkRouter) never renormalizes
    c.group_score = "max"
    method = d.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedArchitecture(
            f"config.json of a deepseek_v2 model: topk_method {method!r} is not DeepSeek-V2's; "
            "expected greedy or group_limited_greedy"
        )
    if method == "greedy":
        c.n_group = c.topk_group = 1
    return c


def _gpt_oss(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.qkv_bias = c.o_bias = d.get("attention_bias", True)
    c.attention_sinks = True
    c.num_experts = d["num_local_experts"]
    c.top_k = d["num_experts_per_tok"]
    c.moe_intermediate_size = d["intermediate_size"]
    c.routing = "topk_softmax"
    c.router_bias = True
    c.expert_act = "gptoss"
    c.expert_bias = True
    c.swiglu_alpha = d.get("swiglu_alpha", 1.702)
    c.swiglu_limit = d.get("swiglu_limit", 7.0)
    c.moe_layers = [True] * c.num_layers
    return c


def _phimoe(d: dict) -> ModelConfig:
    c = ModelConfig(**_base(d))
    c.norm = "layer"
    c.qkv_bias = c.o_bias = d.get("attention_bias", False)
    c.lm_head_bias = d.get("lm_head_bias", False)
    c.num_experts = d["num_local_experts"]
    c.top_k = d["num_experts_per_tok"]
    c.moe_intermediate_size = d["intermediate_size"]
    c.routing = "sparsemixer"
    c.router_jitter_eps = d.get("router_jitter_noise", 0.01)
    c.moe_layers = [True] * c.num_layers
    if c.top_k != 2:
        raise UnsupportedArchitecture(
            f"PhiMoE routing (sparsemixer) is defined for top-2 only, got {c.top_k}"
        )
    return c


FAMILIES = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "phimoe": _phimoe,
    "llama": _llama,  # dense; the source model of `moepager moefy`
    "mistral": _llama,
}


# config.json keys read above, by the type their value must have (null is allowed: it means "not set")
_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "max_position_embeddings", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
         "n_routed_experts", "num_experts_per_tok", "shared_expert_intermediate_size", "n_shared_experts",
         "decoder_sparse_step", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
         "n_group", "topk_group", "first_k_dense_replace", "moe_layer_freq", "sliding_window")  # fmt: skip
_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "routed_scaling_factor", "swiglu_alpha", "swiglu_limit",
           "router_jitter_noise", "clip_qkv")  # fmt: skip
_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _check_types(d: dict, family: str) -> None:
    """A wrongly typed value ("hidden_size": "lots") is named here, before it fails somewhere deep inside."""
    for key in _INTS + _FLOATS:
        v = d.get(key)
        low = 1 if key in _POSITIVE else 0
        kind = f"an integer >= {low}" if key in _INTS else "a number"
        ok = v is None or (
            isinstance(v, int) and not isinstance(v, bool) and v >= low
            if key in _INTS
            else isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if not ok:
            raise UnsupportedArchitecture(
                f"config.json of a {family} model: {key} is {v!r}, expected {kind}; fix that field"
            )


def config_from_hf(d: dict) -> ModelConfig:
    """Translate a Hugging Face config.json dict; unknown keys are ignored."""
    family = d.get("model_type")
    if family not in FAMILIES:
        arch = ", ".join(d.get("architectures") or []) or "no architectures field"
        raise UnsupportedArchitecture(
            f"model_type {family!r} ({arch}) is not supported; supported: {', '.join(FAMILIES)}"
        )
    _check_types(d, family)
    try:
        return FAMILIES[family](d)
    except KeyError as e:
        raise UnsupportedArchitecture(
            f"config.json of a {family} model lacks the field {e.args[0]!r}"
        ) from None
