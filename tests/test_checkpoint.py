"""Checkpoint sources: sharded folders and the local Hugging Face cache."""

import torch
from tiny_models import build

import moepager


def test_sharded_checkpoint_matches_single_file(tiny, tmp_path):
    single, _ = tiny("olmoe")
    build("olmoe", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.arange(10)[None]
    assert torch.equal(moepager.load(tmp_path).logits(ids), moepager.load(single).logits(ids))


def test_hub_id_from_local_cache(tiny, tmp_path, monkeypatch):
    src, _ = tiny("mixtral")
    snap = tmp_path / "hub" / "models--tiny--mixtral" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    refs = tmp_path / "hub" / "models--tiny--mixtral" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    engine = moepager.load("tiny/mixtral")
    assert engine.path == snap
