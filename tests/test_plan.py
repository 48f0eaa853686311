"""`moepager plan` and the context a memory limit leaves: fields and arithmetic, not timing."""

import dataclasses
import re

import psutil
import pytest

import moepager
from moepager.cli import main
from moepager.errors import MoepagerError
from moepager.paging.paged import fit_context, fixed_buffers
from moepager.runtime.plan import plan


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_plan_fields_add_up(tiny):
    path = tiny("qwen3_moe")[0]
    p = plan(str(path), _rss() + 256 * 2**20, max_context=128, seconds=0.05)
    assert p.context == 128 and p.context_note is None
    parts = p.runtime_bytes + p.dense_bytes + p.kv_bytes + p.buffer_bytes
    assert (
        p.dense_bytes > 0
        and p.kv_bytes > 0
        and parts + p.expert_budget_bytes + p.staging_bytes <= p.memory_bytes
    )
    assert p.cache_experts == p.total_experts == 32  # 2 MoE layers of 16: a tiny model fits whole
    # the cold cache reads what the prompt and the first tokens ask for, then nothing: the steady state hits
    assert p.disk_bytes_measured > 0 and p.prefill_misses > 0
    assert p.hit_rate == 1.0 and p.read_s_per_token == 0.0 and p.misses_per_token == 0.0
    assert p.compute_s_per_token > 0 and p.steady_tokens_per_s == pytest.approx(1 / p.compute_s_per_token)
    assert 0 < p.decode_tokens_per_s <= p.steady_tokens_per_s * 1.0001


@pytest.fixture(scope="module")
def large_experts(tmp_path_factory):
    """A Qwen3-MoE with 6 MiB experts (32 of them), so a limit can leave room for some and not all, whatever
    the few MiB the test process grows by between two loads."""
    import torch
    import transformers as tf
    from tiny_models import COMMON

    out = tmp_path_factory.mktemp("large_experts")
    config = tf.Qwen3MoeConfig(**{**COMMON, "hidden_size": 128}, num_experts=16, num_experts_per_tok=4,
                               moe_intermediate_size=4096, head_dim=32)  # fmt: skip
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def test_plan_with_experts_paged(large_experts, capsys):
    probe = plan(str(large_experts), _rss() + 2**30, max_context=128, seconds=0.02)
    assert probe.cache_experts == probe.total_experts == 32
    footprint = (
        probe.runtime_bytes + probe.dense_bytes + probe.kv_bytes + probe.buffer_bytes + probe.staging_bytes
    )
    limit = footprint + 16 * probe.slot_bytes  # room for about half of the experts
    assert (
        main(
            ["plan", str(large_experts), "--memory", str(limit), "--max-context", "128", "--seconds", "0.05"]
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in ("runtime", "dense weights", "KV cache at 128 tokens", "buffers", "expert cache", "disk:",
                "GB/s", "compute:", "ms per token", "predicted decode:", "tokens/s", "uniformly", "run with:"):  # fmt: skip
        assert row in out, row
    slots = int(re.search(r"(\d+) of 32 experts", out)[1])
    assert 8 <= slots <= 24, out  # about 16: the process grows or shrinks by some MiB between two loads
    assert f"moepager run {large_experts} --memory-limit {limit} --max-context 128" in out


def test_plan_refuses_a_limit_below_the_dense_part(tiny, capsys):
    path = tiny("mixtral")[0]
    capsys.readouterr()  # building the model may have written a progress bar
    err = _error_of(["plan", str(path), "--memory", "10MiB"], capsys)
    assert "raise the limit to at least" in err
    assert "--seconds 0.0" in _error_of(["plan", str(path), "--memory", "1GiB", "--seconds", "0"], capsys)
    assert "--memory: cannot read 'lots'" in _error_of(["plan", str(path), "--memory", "lots"], capsys)


def _error_of(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_memory_limit_fits_the_context_when_none_was_asked_for(tiny, monkeypatch):
    engine = moepager.load(tiny("mixtral")[0])
    # the arithmetic of fitting, on this process's RSS as it is: dropping library pages and leaving out those pytest
    # shares (tested in test_memory_limit.py) would move it by more than the 256 tokens of context asserted on
    monkeypatch.setattr("moepager.paging.paged.page_out_libraries", lambda: 0)
    monkeypatch.setattr("moepager.paging.paged.unique_bytes", _rss)
    config = dataclasses.replace(engine.config, max_position_embeddings=8192)
    per_token = (  # K and V of every layer and of one layer more (a buffer growing), activations
        2 * config.num_kv_heads * config.head_dim * 4 * (config.num_layers + 1) + 16 * config.hidden_size * 4
    )
    limit = (
        _rss() + fixed_buffers(config) + 1100 * per_token + 2**20
    )  # about 1100 tokens of context and 1 MiB of experts
    footprint, note = fit_context(limit, engine.model, config, engine.device, None, 2**20)
    # the context takes half of the room at most, the experts the rest: 512 tokens, up to 1024 when asked
    assert footprint["context"] == 512 and "leaves room for a context of 512" in note
    assert "up to 768" in note or "up to 1024" in note
    with pytest.raises(MoepagerError, match=r"at a context of 4096 tokens.*can be at most (768|1024) tokens"):
        fit_context(limit, engine.model, config, engine.device, 4096, 2**20)
    footprint, note = fit_context(limit, engine.model, config, engine.device, 512, 2**20)
    assert footprint["context"] == 512 and note is None
