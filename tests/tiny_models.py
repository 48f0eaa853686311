"""Tiny random MoE checkpoints of every supported family, written with transformers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.05,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip


def configs():
    import transformers as tf

    return {
        "mixtral": lambda: tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=24),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **{**COMMON, "num_hidden_layers": 3}, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
            head_dim=16, norm_topk_prob=True, mlp_only_layers=[1]),
        "olmoe": lambda: tf.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, n_routed_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8),
        # DeepSeek-V2-Lite's attention (no q_lora_rank: one q_proj), full V2's group_limited_greedy routing
        "deepseek_v2": lambda: tf.DeepseekV2Config(
            **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, n_routed_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=4, topk_group=2,
            topk_method="group_limited_greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "gpt_oss": lambda: tf.GptOssConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8),
        # Phi-3.5-MoE's own config has biases on q/k/v/o and the output head
        "phimoe": lambda: tf.PhimoeConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True),
    }  # fmt: skip


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe"]


def build(family: str, out: Path, seed: int = 0, max_shard_size: str | None = None, **config_fields):
    """Write a random fp32 checkpoint of `family` to `out`; return the transformers model.
    config_fields: values that replace the tiny config's."""
    import transformers as tf

    torch.manual_seed(seed)
    config = configs()[family]()
    for key, value in config_fields.items():
        setattr(config, key, value)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return model


def randomize(model) -> None:
    """Every parameter random: transformers starts biases at zero and norm weights at one, where an engine that
    ignored them would still match. Rotary frequencies (buffers) stay as computed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 0.5)
            elif p.numel() > 1 and p.min() == p.max() == 1:  # norm weights
                p.uniform_(0.5, 1.5)
            elif p.min() == p.max():  # biases (attention, experts, LayerNorm, the output head)
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)


def write_word_tokenizer(out: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary ("w0".."w127"), so text prompts work."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))


def copy_with_tokenizer(src: Path, out: Path, chat_template: str | None = None) -> Path:
    """A copy of the tiny checkpoint at src with the word tokenizer (and a chat template, if given)."""
    import shutil

    shutil.copytree(src, out, dirs_exist_ok=True)
    write_word_tokenizer(out)
    if chat_template is not None:
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def assert_like_reference(engine, ref, new_tokens: int = 16) -> None:
    """The engine's logits within 1e-4 of the transformers model `ref`, and its greedy tokens identical."""
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (engine.logits(ids) - expected).abs().max().item() < 1e-4
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert engine.generate(prompt[0], max_new_tokens=new_tokens, stop_ids=[]) == want[0, 7:].tolist()


def record_gpt_oss_projections(ref) -> list:
    """Have a transformers GPT-OSS record each expert call's gate/up projections before they are clamped;
    returns the list they are appended to ([tokens * K, 2I] each, gate and up interleaved)."""
    seen = []
    for layer in ref.model.layers:
        experts = layer.mlp.experts
        apply_gate = experts._apply_gate

        def record(gate_up, apply_gate=apply_gate):
            seen.append(gate_up.detach().clone())
            return apply_gate(gate_up)

        experts._apply_gate = record
    return seen
