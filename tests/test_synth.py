"""`moepager synth` writes checkpoints that moepager and transformers both load, with equal logits."""

import json

import pytest
import torch

import moepager
from moepager.cli import main
from moepager.errors import MoepagerError
from moepager.synth.checkpoint import SynthSpec, plan, synth
from moepager.system.sizes import parse_size

SMALL = dict(hidden=64, intermediate=96, experts=4, top_k=2, heads=4, kv_heads=2, head_dim=16, vocab=256)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_synth_loads_with_equal_logits(tmp_path, family):
    import transformers

    out = synth(tmp_path / "m", SynthSpec(family=family, layers=2, dtype="float32", **SMALL),
                max_shard=200_000, progress_bar=False)  # fmt: skip
    assert (out / "model.safetensors.index.json").exists()  # small shards: the sharded layout is exercised
    assert not list(tmp_path.glob(".*partial*"))
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = moepager.load(out).logits(ids)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_synth_size_sets_layers_and_file_size(tmp_path):
    spec = SynthSpec(dtype="bfloat16", **SMALL)
    out = synth(tmp_path / "m", spec, size=parse_size("1MiB"), progress_bar=False)
    meta = json.loads((out / "synth.json").read_text())
    assert meta["layers"] == plan(spec, 1 << 20).layers >= 1
    assert (out / "model.safetensors").stat().st_size <= (1 << 20) + 64 * 1024
    assert moepager.load(out).generate([1, 2, 3], 3, stop_ids=[])


def test_synth_cli_and_errors(tmp_path, capsys):
    argv = [
        "synth",
        str(tmp_path / "m"),
        "--layers",
        "1",
        "--hidden",
        "32",
        "--intermediate",
        "48",
        "--quiet",
    ]
    assert main(argv) == 0
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--size", "8 parsecs"]) == 2
    with pytest.raises(MoepagerError, match="cannot be synthesized"):
        plan(SynthSpec(family="jamba", layers=1), None)
