"""The compiled decode step (model/fused_decode.py, kernels/decode_step.py) against transformers, and the cases that
must take the eager path instead. Plain float32 layers with plain RoPE decode as one ggml graph
(tests/test_float_step.py): the compiled step is theirs where the RoPE is scaled, as these tiny models' is."""

import pytest
import torch
from tiny_models import VOCAB, build, configs

import moepager
from moepager.kernels import decode_step
from moepager.model.decoder import Transformer
from moepager.model.layers import KVCache

FUSED = ["mixtral", "qwen3_moe"]  # qwen3_moe's tiny model has qk-norm and a dense MLP layer too


@pytest.fixture
def scaled(tmp_path):
    """scaled(family) -> (path, transformers model): the tiny model with linearly scaled RoPE."""

    def get(family: str):
        rope = {**configs()[family]().rope_parameters, "rope_type": "linear", "factor": 2.0}
        path = tmp_path / family
        return path, build(family, path, rope_parameters=rope)

    return get


@pytest.fixture
def steps(monkeypatch):
    """Counts of the compiled steps' calls, by name."""
    calls = {}
    for name in ("layers_step", "head_step"):
        real = getattr(decode_step, name)

        def counted(*args, real=real, name=name):
            calls[name] = calls.get(name, 0) + 1
            return real(*args)

        monkeypatch.setattr(decode_step, name, counted)
    return calls


def decode_logits(engine, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """ids [1, T]: the prompt's first `prefill` tokens in one forward, then one token per step -> logits of
    every decoded position [T - prefill, V]."""
    cache = KVCache(engine.config.num_layers)
    with torch.inference_mode():
        engine.model(ids[:, :prefill], cache)
        return torch.cat([engine.model(ids[:, t : t + 1], cache)[0] for t in range(prefill, ids.shape[1])])


@pytest.mark.parametrize("family", FUSED)
def test_compiled_steps_match_transformers(scaled, family, steps):
    path, ref = scaled(family)
    engine = moepager.load(path)
    assert type(engine.model).__name__ == "FusedDecodeTransformer"
    steps.clear()  # loading ran each step once on a tiny layer, to have its compiled code ready
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(ids).logits[0, 6:]
    got = decode_logits(engine, ids, 6)
    assert (got - expected).abs().max().item() < 1e-4
    assert steps["layers_step"] == 14 and steps["head_step"] == 14
    # the eager path on the same model and cache positions: the two agree as closely
    engine.model.__class__ = Transformer
    assert (decode_logits(engine, ids, 6) - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_other_layers_stay_eager(tiny, family):
    """Full-projection qk-norm, biases and sinks, latent attention: not what it (or the ggml step) computes."""
    assert type(moepager.load(tiny(family)[0]).model) is Transformer


def test_hooks_paging_and_batches_take_the_eager_path(scaled, steps):
    path, ref = scaled("qwen3_moe")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ref(ids).logits[0, 8:]
    engine, paged = moepager.load(path), moepager.load(path, expert_memory="50%")
    steps.clear()
    seen = []
    handle = engine.model.layers[0].attn.q_proj.register_forward_hook(
        lambda m, a, out: seen.append(out.shape)
    )
    assert (decode_logits(engine, ids, 8) - expected).abs().max().item() < 1e-4
    assert len(seen) == 1 + 4 and "layers_step" not in steps  # the hook saw every step
    handle.remove()
    assert (decode_logits(paged, ids, 8) - expected).abs().max().item() < 1e-4
    assert "layers_step" not in steps  # paged experts decide slots per layer on the host
    batch = torch.cat([ids, ids.flip(1)])
    cache = KVCache(engine.config.num_layers)
    with torch.inference_mode():
        engine.model(batch[:, :8], cache)
        engine.model(batch[:, 8:9], cache)
    assert "layers_step" not in steps
