"""A float32 checkpoint's decode step as one ggml graph (model/ggml_decode.py over kernels/ggml_step.py), against
transformers: resident and paged experts, routers that nearly tie (routed by the torch layers, as the reference
routes them), and torch's threads given back to a prompt."""

import pytest
import torch
from tiny_models import VOCAB

import moepager
from moepager.kernels import ggml, ggml_routing, ggml_step
from moepager.kernels.thread_choice import ThreadChoice
from moepager.model.layers import KVCache

ONE_GRAPH = ["mixtral", "qwen2_moe", "qwen3_moe"]  # qwen2_moe: a gated shared expert and q/k/v biases;
# qwen3_moe: per-head qk-norm and a dense MLP layer


@pytest.fixture
def steps(monkeypatch):
    """Calls of the step graphs: {"run": how many, "handed": of those, how many went to the layers (None)}."""
    calls = {"run": 0, "handed": 0}
    for name in ("decode_step", "decode_step_paged"):
        real = getattr(ggml_step, name)

        def counted(*args, real=real):
            logits = real(*args)
            calls["run"] += 1
            calls["handed"] += logits is None
            return logits

        monkeypatch.setattr(ggml_step, name, counted)
    return calls


def decode_logits(engine, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """ids [1, T]: the first `prefill` tokens in one forward, then one token per step -> logits [T - prefill, V]."""
    cache = KVCache(engine.config.num_layers)
    with torch.inference_mode():
        engine.model(ids[:, :prefill], cache)
        return torch.cat([engine.model(ids[:, t : t + 1], cache)[0] for t in range(prefill, ids.shape[1])])


@pytest.mark.parametrize("family", ONE_GRAPH)
@pytest.mark.parametrize("paging", [{}, {"expert_memory": "50%"}], ids=["resident", "paged"])
def test_float_checkpoints_decode_in_one_graph(tiny, family, paging, steps):
    path, ref = tiny(family)
    engine = moepager.load(path, **paging)
    assert type(engine.model).__name__ == "GgmlDecodeTransformer"
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(ids).logits[0, 6:]
    got = decode_logits(engine, ids, 6)
    assert (got - expected).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert steps["run"] == 24 and steps["handed"] <= 2  # a rare near tie goes to the layers


def test_near_ties_go_to_the_layers_and_then_every_token(tiny, steps, monkeypatch):
    """Every router's probabilities taken as close: each step hands its token to the torch layers, which match the
    reference; after two such steps in a row from the first, the model's tokens go there without a step."""
    monkeypatch.setattr(ggml_routing, "TORCH_CLOSE", 1.0)
    path, ref = tiny("qwen3_moe")
    engine = moepager.load(path)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ref(ids).logits[0, 6:]
    assert (decode_logits(engine, ids, 6) - expected).abs().max().item() < 1e-4
    assert steps["run"] == steps["handed"] == 2


def test_a_prompt_gets_torch_threads_back(tiny, monkeypatch):
    """A block product gives ggml's pool the cores (torch's ops then run on one thread); a checkpoint's prompt,
    whose products are torch's, takes them back."""
    engine = moepager.load(tiny("mixtral")[0])
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    monkeypatch.setattr(ggml._cores, "choice", ThreadChoice(2), raising=False)
    try:
        torch.set_num_threads(2)
        ggml._threads()  # what a decode step of a larger model does
        assert torch.get_num_threads() == 1
        with torch.inference_mode():
            engine.model(ids, KVCache(engine.config.num_layers))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
