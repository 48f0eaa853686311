"""The `moepager run` command and the one-line errors a user can cause."""

import json
import shutil
import subprocess
import sys

import pytest
from tiny_models import copy_with_tokenizer

from moepager.cli import main


@pytest.fixture(scope="module")
def model_with_tokenizer(tiny, tmp_path_factory):
    return copy_with_tokenizer(tiny("mixtral")[0], tmp_path_factory.mktemp("with_tok"))


def test_run_prints_text(model_with_tokenizer, capsys):
    assert main(["run", str(model_with_tokenizer), "--prompt", "w1 w2 w3", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("w") >= 5


def test_run_json_with_prompt_ids(tiny, capsys):
    path, _ = tiny("qwen3_moe")
    assert main(["run", str(path), "--prompt-ids", "1,2,3", "--max-tokens", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == 4
    assert record["stats"]["decode_tokens"] == 3
    assert record["stats"]["peak_memory_bytes"] > 0


def test_sampling_is_reproducible_with_seed(tiny):
    import moepager

    engine = moepager.load(tiny("mixtral")[0])
    a = engine.generate([1, 2, 3], 16, temperature=1.0, top_p=0.9, top_k=50, seed=7, stop_ids=[])
    b = engine.generate([1, 2, 3], 16, temperature=1.0, top_p=0.9, top_k=50, seed=7, stop_ids=[])
    assert a == b and len(a) == 16


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_bad_path(capsys):
    assert "no such model folder" in _error(["run", "/nonexistent/model", "--prompt-ids", "1"], capsys)


def test_uncached_hub_id(capsys):
    err = _error(["run", "nobody/no-such-model", "--prompt-ids", "1"], capsys)
    assert "local Hugging Face cache" in err and "hf download nobody/no-such-model" in err
    # the command the hint names is the one huggingface_hub installs (huggingface-cli is gone)
    import importlib.metadata

    scripts = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points}
    assert "hf" in scripts


def test_missing_weights_file(tiny, tmp_path, capsys):
    src, _ = tiny("mixtral")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    assert "no *.safetensors" in _error(["run", str(tmp_path), "--prompt-ids", "1"], capsys)


def test_corrupt_safetensors_header(tiny, tmp_path, capsys):
    src, _ = tiny("mixtral")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    assert "corrupt safetensors header" in _error(["run", str(tmp_path), "--prompt-ids", "1"], capsys)


def test_truncated_safetensors(tiny, tmp_path, capsys):
    src, _ = tiny("mixtral")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(["run", str(tmp_path), "--prompt-ids", "1"], capsys)


def test_unsupported_architecture(tiny, tmp_path, capsys):
    src, _ = tiny("mixtral")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="jamba", architectures=["JambaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    err = _error(["run", str(tmp_path), "--prompt-ids", "1"], capsys)
    assert "'jamba'" in err and "mixtral" in err and "deepseek_v3" in err


def test_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moepager", "run", str(tmp_path / "x"), "--prompt-ids", "1"],
                          capture_output=True, text=True)  # fmt: skip
    assert (
        proc.returncode == 2 and proc.stderr.startswith("moepager: error:") and "Traceback" not in proc.stderr
    )
