"""Models pulled by ollama run by the name ollama gives them, read in place from its store; `moepager list`
shows what the Hugging Face cache and ollama's store hold. The stores are laid out here as those tools
lay them out, holding a real GGUF (a tiny Mixtral with a SentencePiece vocabulary)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_gguf import write_gguf
from test_gguf_models import PROMPT, tiny_with_tokenizer

import moepager
from moepager.cli import main

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def add_to_ollama(root: Path, gguf: Path, manifest: str) -> Path:
    """Put a GGUF into an ollama store as `ollama pull` leaves it: a blob named by its sha256, a manifest."""
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    template = b"{{ .Prompt }}"
    (root / "blobs" / f"sha256-{hashlib.sha256(template).hexdigest()}").write_bytes(template)
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)},
        {"mediaType": "application/vnd.ollama.image.template",
         "digest": f"sha256:{hashlib.sha256(template).hexdigest()}", "size": len(template)},
    ]  # fmt: skip
    path = root / "manifests" / manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": layers}))
    return blob


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ollama-model")
    folder, vocab = tiny_with_tokenizer("mixtral", "spm", tmp / "hf")
    write_gguf(folder, tmp / "tiny.gguf", vocab=vocab)
    return folder, tmp / "tiny.gguf"


@pytest.fixture
def store(tmp_path, monkeypatch, tiny_gguf):
    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    blobs = {
        "tinymix:q8": add_to_ollama(root, tiny_gguf[1], "registry.ollama.ai/library/tinymix/q8"),
        "tinymix": add_to_ollama(root, tiny_gguf[1], "registry.ollama.ai/library/tinymix/latest"),
        "hf.co/org/tiny-GGUF:Q8_0": add_to_ollama(root, tiny_gguf[1], "hf.co/org/tiny-GGUF/Q8_0"),
    }
    return root, blobs


def run_json(model: str, capsys) -> dict:
    assert main(["run", model, "--prompt", PROMPT, "--max-tokens", "6", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_runs_by_ollama_name_in_place(store, tiny_gguf, capsys):
    root, blobs = store
    want = run_json(str(tiny_gguf[0]), capsys)  # the checkpoint the GGUF was made from
    for name in ["tinymix:q8", "library/tinymix:q8", "registry.ollama.ai/library/tinymix:q8", "tinymix",
                 "tinymix:latest", "hf.co/org/tiny-GGUF:Q8_0"]:  # fmt: skip
        got = run_json(name, capsys)
        assert (got["text"], got["token_ids"]) == (want["text"], want["token_ids"]), name
    before = sorted(p for p in root.rglob("*"))
    assert moepager.load("tinymix:q8").path == blobs["tinymix:q8"]  # the blob itself: nothing copied
    assert sorted(p for p in root.rglob("*")) == before


def test_missing_or_broken_ollama_models_are_clear_errors(store, capsys):
    root, blobs = store
    assert main(["run", "nosuch:7b", "--prompt", "hi"]) == 2
    assert "ollama pull nosuch:7b" in capsys.readouterr().err
    with open(blobs["tinymix:q8"], "r+b") as f:
        f.truncate(1000)
    assert main(["run", "tinymix:q8", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "1000 bytes, its manifest says" in err and "ollama pull tinymix:q8" in err
    os.unlink(blobs["tinymix"])
    assert main(["run", "tinymix", "--prompt", "hi"]) == 2
    assert "is missing" in capsys.readouterr().err


def add_to_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """A snapshot as huggingface_hub leaves it: files in blobs/, symlinked from snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        shutil.copy(f, blob)
        link = repo / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_list_shows_hf_cache_and_ollama_models(store, tiny_gguf, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    add_to_hf_cache(cache, "org/tiny-moe", tiny_gguf[0])
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    add_to_hf_cache(cache, "org/dense-llama", dense)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert main(["list", "--json"]) == 0
    found = {m["name"]: m for m in json.loads(capsys.readouterr().out) if m["where"] != "embedded"}
    assert set(found) == {"org/tiny-moe", "tinymix:latest", "tinymix:q8", "hf.co/org/tiny-GGUF:Q8_0"}
    assert found["org/tiny-moe"]["family"] == "mixtral" and found["org/tiny-moe"]["where"] == "hf-cache"
    assert (
        found["tinymix:q8"]["family"] == "llama"
        and found["tinymix:q8"]["size"] == tiny_gguf[1].stat().st_size
    )
    assert main(["list"]) == 0
    assert "moepager run tinymix:q8" in capsys.readouterr().out
