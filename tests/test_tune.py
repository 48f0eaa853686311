"""Fine-tuning chosen experts: gradients against transformers' autograd, and `moepager tune` end to end."""

import shutil

import pytest
import torch
from tiny_models import VOCAB, copy_with_tokenizer

import moepager
import moepager.store
from moepager.cli import main
from moepager.store.convert import convert
from moepager.training.tune import ExpertTrainer


def _hf_grads(ref, ids, layer_prefix_experts, chosen, inter):
    """Gradients of transformers' own model for the chosen experts' gate/up/down and router rows."""
    ref.requires_grad_(True)
    ref.zero_grad()
    logits = ref(ids).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    out = {}
    for layer, e in chosen:
        mlp = layer_prefix_experts(ref, layer)
        gu, down = mlp.experts.gate_up_proj.grad[e], mlp.experts.down_proj.grad[e]
        out[(layer, e)] = {
            "gate": gu[:inter],
            "up": gu[inter:],
            "down": down,
            "router": mlp.gate.weight.grad[e],
        }
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gradients_match_transformers(tiny, tmp_path, family):
    """Trained experts in layer 0 get the gradient transformers computes, through the frozen experts of the
    later layers (recomputed from the cache in backward) and the routing weights."""
    src, ref = tiny(family)
    store = convert(src, tmp_path / "store", progress=False)
    engine = moepager.load(store, expert_memory="30%", prefetch=False)  # frozen experts paged
    moe = [i for i, m in enumerate(engine.config.moe_layers) if m]
    chosen = [(moe[0], 1), (moe[0], 2), (moe[-1], 0)]
    trainer = ExpertTrainer(engine, chosen, router=True)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = trainer.loss(ids)
    loss.backward()
    want = _hf_grads(
        ref, ids, lambda m, i: m.model.layers[i].mlp, chosen, engine.config.moe_intermediate_size
    )
    for key in chosen:
        p = trainer.trained[key]
        for name in ("gate", "up", "down"):
            assert torch.allclose(p[name].grad, want[key][name], atol=1e-6, rtol=1e-4), (key, name)
        r = trainer.routers[key[0]]
        row = r.rows.tolist().index(key[1])
        assert torch.allclose(r.weight.grad[row], want[key]["router"], atol=1e-6, rtol=1e-4), key
    assert all(
        not p.requires_grad for p in engine.model.parameters() if all(p is not q for q in trainer.params)
    )
    trainer.close()
    ref.requires_grad_(False)


@pytest.mark.slow
def test_tune_cli_lowers_the_loss_and_commits_generations(tiny, tmp_path, capsys):
    src, _ = tiny("qwen3_moe")
    model = copy_with_tokenizer(src, tmp_path / "model")
    store = convert(model, tmp_path / "store", progress=False)
    rng = torch.Generator().manual_seed(0)
    pattern = " ".join(f"w{i}" for i in torch.randint(0, 20, (40,), generator=rng).tolist())
    (tmp_path / "text.txt").write_text(" ".join([pattern] * 30))
    before = moepager.load(store).logits(torch.arange(10)[None])
    argv = [
        "tune",
        str(store),
        "--text",
        str(tmp_path / "text.txt"),
        "--auto",
        "4",
        "--router",
        "--steps",
        "30",
        "--seq-len",
        "64",
        "--lr",
        "1e-2",
        "--save-every",
        "15",
        "--expert-memory",
        "30%",
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "generations 1, 2" in out
    first, last = [float(x) for x in out.split("loss ")[1].split(";")[0].split("->")]
    assert last < first
    assert main(["experts", str(store), "generations"]) == 0
    assert "tune step 30" in capsys.readouterr().out
    assert not torch.equal(moepager.load(store).logits(torch.arange(10)[None]), before)
    assert main(["tune", str(store), "--text", str(tmp_path / "text.txt"), "--steps", "1"]) == 2
    assert "--auto" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "store")
