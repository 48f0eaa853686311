"""Editing a store: replace, add, disable and remove experts, generations, rollback and gc, against transformers
on the same edit made to the checkpoint's own files."""

import shutil

import pytest
import torch
from edited_models import load_reference, read_layers, write_layers
from tiny_models import VOCAB, assert_like_reference

import moepager
import moepager.store
from moepager.cli import main
from moepager.errors import MoepagerError
from moepager.store.convert import convert
from moepager.store.format import read_manifest
from moepager.store.verify import verify

FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss", "olmoe", "phimoe"]


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            src, _ = tiny(family)
            made[family] = convert(src, tmp_path_factory.mktemp("stores") / family, progress=False)
        return made[family]

    return get


@pytest.fixture
def store(converted, tmp_path):
    """store(family) -> a fresh copy of the family's converted store."""

    def get(family):
        path = tmp_path / f"store-{family}"
        shutil.copytree(converted(family), path)
        return path

    return get


def random_expert(like: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float32) * 0.1 for k, v in like.items()}


def assert_matches(path, ref_path):
    ref = load_reference(ref_path)
    assert_like_reference(moepager.load(path), ref)
    paged = moepager.load(path, expert_memory="30%", prefetch=False)  # re-read from the store as needed
    assert_like_reference(paged, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_add_remove_match_transformers(tiny, store, tmp_path, family):
    src, _ = tiny(family)
    config, sd, layers = read_layers(src)
    path = store(family)
    with moepager.store.open(path, writable=True) as st:
        moe = st.moe_layers()
        like = st.read_expert(moe[0], 0)
        # replace expert 1 of the first MoE layer
        new = random_expert(like, 10)
        st.replace(moe[0], 1, new)
        layers[moe[0]][0][1] = new
        # add one expert to every MoE layer, with its router row (and bias where the family has one)
        for i, layer in enumerate(moe):
            w, row = random_expert(like, 20 + i), torch.randn(config["hidden_size"]) * 0.5
            bias = 0.3 if family == "gpt_oss" else None
            e = st.add(layer, w, row, router_bias=bias)
            assert e == len(layers[layer][0])
            experts, router = layers[layer]
            experts.append(w)
            router["weight"] = torch.cat([router["weight"], row[None]])
            if "bias" in router:
                router["bias"] = torch.cat([router["bias"], torch.tensor([bias])])
        # remove expert 0 of every MoE layer: the reference drops it and renumbers the rest
        for layer in moe:
            st.remove(layer, 0)
            experts, router = layers[layer]
            del experts[0]
            for k in router:
                router[k] = router[k][1:]
        gen = st.commit("edit")
    assert gen == 1
    assert_matches(path, write_layers(src, tmp_path / "ref", config, sd, layers))
    assert verify(path, progress=False).ok


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_one_layer_grows_and_the_others_pad(tiny, store, tmp_path, family):
    """Layer A loses expert 1 and gains one (E grows); the other layers get an absent padding expert, so every
    layer still routes among E experts, as the reference with A's experts renumbered."""
    src, _ = tiny(family)
    config, sd, layers = read_layers(src)
    path = store(family)
    with moepager.store.open(path, writable=True) as st:
        a = st.moe_layers()[-1]
        st.remove(a, 1)
        w, row = random_expert(st.read_expert(a, 0), 5), torch.randn(config["hidden_size"])
        assert st.add(a, w, row) == st.num_experts - 1 == len(layers[a][0])
        st.commit()
    experts, router = layers[a]
    layers[a] = (
        [x for i, x in enumerate(experts) if i != 1] + [w],
        {
            k: torch.cat([v[:1], v[2:], row[None] if k == "weight" else torch.zeros(1)])
            for k, v in router.items()
        },
    )
    assert_matches(path, write_layers(src, tmp_path / "ref", config, sd, layers))
    assert read_manifest(path).absent == {lay: ((1,) if lay == a else (len(experts),)) for lay in layers}


def test_disable_enable_and_errors(store):
    path = store("mixtral")
    engine0 = moepager.load(path)
    ids = torch.arange(12)[None]
    with moepager.store.open(path, writable=True) as st:
        st.disable(0, 2)
        with pytest.raises(MoepagerError, match="routes to 2"):
            st.disable(0, 1), st.disable(0, 3)
        with pytest.raises(MoepagerError, match="not disabled"):
            st.enable(0, 3)
        st.enable(0, 1)
        st.enable(0, 2)
        st.commit()
        with pytest.raises(MoepagerError, match="nothing to commit"):
            st.commit()
        with pytest.raises(MoepagerError, match="shape"):
            st.replace(0, 1, {k: v[:1] for k, v in st.read_expert(0, 1).items()})
        with pytest.raises(MoepagerError, match="not a MoE layer|experts 0..3"):
            st.replace(0, 9, st.read_expert(0, 1))
        with pytest.raises(MoepagerError, match="another process"):
            moepager.store.open(path, writable=True)
    assert torch.equal(moepager.load(path).logits(ids), engine0.logits(ids))


def test_grouped_routing_is_refused(store):
    with moepager.store.open(store("deepseek_v3"), writable=True) as st:
        with pytest.raises(MoepagerError, match="n_group=2 groups"):
            st.add(1, st.read_expert(1, 0), torch.zeros(32))


def test_generations_rollback_and_gc(store, capsys):
    path = store("mixtral")
    ids = torch.arange(10)[None]
    logits = [moepager.load(path).logits(ids)]
    with moepager.store.open(path, writable=True) as st:
        for g in (1, 2):
            st.replace(0, 1, random_expert(st.read_expert(0, 1), g))  # generation 2 drops 1's bytes
            assert st.commit(f"step {g}") == g
            logits.append(moepager.load(path).logits(ids))
        st.rollback(1)
    assert not torch.equal(logits[1], logits[2])
    assert torch.equal(moepager.load(path).logits(ids), logits[1])
    assert main(["experts", str(path), "generations"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2"] and "*" in lines[1]
    for g in (0, 1, 2):  # every kept generation reads at its own state, and verify covers all of them
        assert torch.equal(moepager.load(moepager.store.open(path, generation=g)).logits(ids), logits[g])
    report = verify(path, progress=False)
    assert report.ok and report.generations == 3
    assert main(["experts", str(path), "rollback", "2"]) == 0
    assert torch.equal(moepager.load(path).logits(ids), logits[2])
    old = moepager.store.open(path, generation=0).manifest.experts[(0, 1)]  # in experts.bin, replaced since
    blocks = (path / "experts.bin").stat().st_blocks
    assert main(["experts", str(path), "gc"]) == 0
    assert "dropped generations 0, 1" in capsys.readouterr().out
    # its bytes in experts.bin, which generation 2 still reads, are freed: the range reads as zeros
    assert (path / "experts.bin").stat().st_blocks < blocks
    with open(path / "experts.bin", "rb") as f:
        f.seek(old.offset)
        assert f.read(old.nbytes) == bytes(old.nbytes)
    assert not (path / "experts.1.bin").exists() and (path / "experts.2.bin").exists()
    assert sorted(p.name for p in (path / "generations").iterdir()) == ["2.json"]
    assert (path / "experts.bin").exists()  # still holds generation 2's untouched experts
    with pytest.raises(MoepagerError, match="no generation 1"):
        moepager.store.open(path, generation=1)
    assert torch.equal(moepager.load(path).logits(ids), logits[2])
    assert verify(path, progress=False).ok


def test_reader_keeps_its_generation_during_a_commit(store):
    import threading

    path = store("qwen3_moe")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    reader = moepager.load(path, expert_memory="30%", prefetch=False)  # reads experts from disk every step
    before = reader.logits(ids)
    outputs, done = [], threading.Event()

    def read_meanwhile():
        while not done.is_set():
            outputs.append(reader.logits(ids))

    thread = threading.Thread(target=read_meanwhile)
    thread.start()
    try:
        with moepager.store.open(path, writable=True) as st:
            for g in range(3):  # commits while the reader runs on generation 0
                for layer in st.moe_layers():
                    for e in range(4):
                        st.replace(layer, e, random_expert(st.read_expert(layer, e), 10 * g + e))
                st.commit()
    finally:
        done.set()
        thread.join()
    after = moepager.load(path).logits(ids)
    assert not torch.equal(after, before)
    assert outputs and all(torch.equal(out, before) for out in outputs)
    assert torch.equal(reader.logits(ids), before)  # the old generation's bytes are untouched
    with moepager.store.open(path, writable=True) as st:
        st.gc(keep=[0])
    assert torch.equal(reader.logits(ids), before) and torch.equal(moepager.load(path).logits(ids), after)


@pytest.mark.parametrize("family", FAMILIES + ["qwen2_moe", "deepseek_v3"])
def test_export_loads_in_transformers_and_matches(store, tmp_path, capsys, family):
    path = store(family)
    if family != "deepseek_v3":  # grouped routing cannot be edited; its export is of the converted store
        with moepager.store.open(path, writable=True) as st:
            layer = st.moe_layers()[0]
            st.replace(layer, 1, random_expert(st.read_expert(layer, 1), 3))
            st.remove(layer, 0)
            st.add(layer, random_expert(st.read_expert(layer, 1), 4), torch.randn(32))
            st.commit()
    assert main(["export", str(path), str(tmp_path / "hf")]) == 0
    ref = load_reference(tmp_path / "hf")
    engine = moepager.load(path)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (engine.logits(ids) - ref(ids).logits).abs().max().item() < 1e-4
    assert main(["export", str(path), str(tmp_path / "hf")]) == 2
    assert "exists" in capsys.readouterr().err


def test_expert_commands(store, tmp_path, capsys):
    path = store("gpt_oss")
    ids = torch.arange(10)[None]
    before = moepager.load(path).logits(ids)
    out = str(tmp_path / "e.safetensors")
    assert main(["experts", str(path), "export", "0", "2", out]) == 0
    assert main(["experts", str(path), "add", "1", out, "-m", "copy of 0:2"]) == 0
    assert "added expert 4 to layer 1: generation 1" in capsys.readouterr().out
    assert main(["experts", str(path), "list"]) == 0
    text = capsys.readouterr().out
    assert "E=5" in text and "layer 0: 4 experts, absent: 4" in text and "layer 1: 5 experts\n" in text
    assert main(["export", str(path), str(tmp_path / "hf")]) == 2
    assert "different numbers of experts (layer 0: 4, layer 1: 5)" in capsys.readouterr().err
    assert main(["experts", str(path), "show", "1", "4"]) == 0
    assert "experts.1.bin" in capsys.readouterr().out
    assert main(["experts", str(path), "remove", "1", "4"]) == 0
    assert main(["experts", str(path), "import", "0", "3", out, "--router"]) == 0
    assert main(["experts", str(path), "import", "0", "3", str(tmp_path / "missing")]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert main(["experts", str(path), "generations"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["0", "1", "2", "3"]
    assert main(["experts", str(path), "rollback", "0"]) == 0
    assert torch.equal(moepager.load(path).logits(ids), before)
    assert main(["experts", str(path), "rollback", "9"]) == 2
    assert main(["experts", str(path), "show", "0"]) == 2
    assert "bad arguments" in capsys.readouterr().err


CHILD = """
import sys, torch, moepager.store
from test_editable import random_expert
with moepager.store.open(sys.argv[1], writable=True) as st:
    print("ready", flush=True)
    while True:
        seed = max(h["id"] for h in st.generations()) + 1
        st.replace(0, 1, random_expert(st.read_expert(0, 1), seed))
        st.set_router_row(0, 1, torch.full((32,), float(seed)))
        st.commit(f"seed {seed}")
"""


@pytest.mark.slow
def test_kill_during_commits_leaves_old_or_new_generation(store):
    """kill -9 at random points of a loop of commits: the store opens at one whole generation and verifies."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = store("mixtral")
    original = moepager.store.open(path).read_expert(0, 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(moepager.__file__).parents[1]),
                                                         str(Path(__file__).parent)])}  # fmt: skip
    rng = random.Random(0)
    seen = set()
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        src = moepager.store.open(path)
        m = src.manifest
        seen.add(m.generation)
        assert verify(path, progress=False).ok
        kept = read_manifest(path, m.generation) if m.generation else None
        if kept is not None:  # manifest.json is exactly the generation's own manifest, plus the history
            assert kept.experts == m.experts and kept.dense_files == m.dense_files and kept.files == m.files
        seed = int(m.history[-1]["message"].split()[1]) if m.history else 0
        assert m.history == [] or m.history[-1]["id"] == m.generation
        router = src.dense_state_dict()["layers.0.ffn.router.weight"][1]
        if seed:
            assert torch.equal(src.read_expert(0, 1)["gate"], random_expert(original, seed)["gate"])
            assert torch.equal(router, torch.full((32,), float(seed)))
        else:
            assert torch.equal(src.read_expert(0, 1)["gate"], original["gate"])
    assert len(seen) > 1
    with moepager.store.open(path, writable=True) as st:  # the next writer removes what killed commits left
        used = set(st.manifest.files) | {
            f for h in st.generations() for f in read_manifest(path, h["id"]).files
        }
    leftovers = {p.name for p in path.iterdir()} - used - {"manifest.json", "generations", ".moepager-lock"}
    assert not leftovers
