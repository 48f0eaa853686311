"""Models run from the hub without downloading them whole: a real HTTP server in the hub's URL layout on
127.0.0.1 (moepager.bench.hub_server), HF_ENDPOINT pointed at it, the remote -> local disk -> RAM tiers."""

import json
import zlib

import pytest
import torch
from serve_process import serve_process
from tiny_models import COMMON, randomize, write_word_tokenizer

import moepager
from moepager.bench.hub_server import HubServer
from moepager.cli import main
from moepager.errors import MoepagerError
from moepager.sources.checkpoint import Checkpoint
from moepager.sources.hub import RemoteSource
from moepager.sources.local_tier import JOURNAL, STATE_DIR

REPO = "org/tiny-moe"
PROMPT = ["--prompt-ids", "1,2,3", "--max-tokens", "5", "--json"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A Qwen3-MoE with 64 small experts per layer (top-2): a short run touches a few of them."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(**COMMON, num_experts=64, num_experts_per_tok=2, moe_intermediate_size=64,
                               head_dim=16, norm_topk_prob=True)  # fmt: skip
    ref = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(ref)
    out = tmp_path_factory.mktemp("hub") / "tiny-moe"
    ref.save_pretrained(out)
    write_word_tokenizer(out)
    return out, ref


@pytest.fixture
def hub(model, monkeypatch):
    """The server, with huggingface_hub pointed at it. The suite runs with HF_HUB_OFFLINE=1, and
    huggingface_hub reads its settings at import, so its constants are patched as well as the environment."""
    from huggingface_hub import constants

    server = HubServer({REPO: model[0]})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()


def _offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _run(capsys, *args) -> dict:
    assert main(["run", *args, *PROMPT]) == 0
    return json.loads(capsys.readouterr().out)


def test_first_run_fetches_dense_and_touched_experts_then_runs_offline(
    model, hub, tmp_path, capsys, monkeypatch
):
    path, _ = model
    local = _run(capsys, str(path))
    store = str(tmp_path / "store")
    first = _run(capsys, REPO, "--remote", "--local-store", store)
    assert first["token_ids"] == local["token_ids"]

    tiers = first["stats"]["tiers"]
    ckpt = Checkpoint(path)
    model_bytes = sum(p.stat().st_size for p in path.iterdir())
    dense = sum(i.nbytes for i in ckpt.dense.values())
    side = sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".json")
    header = 8 + int.from_bytes((path / "model.safetensors").read_bytes()[:8], "little")
    # every byte fetched is a side file, the header, a dense tensor or an expert kept in the local store
    assert tiers["remote"]["bytes_fetched"] == side + header + dense + tiers["local"]["stored_bytes"]
    assert hub.bytes_sent == tiers["remote"]["bytes_fetched"]
    assert 0 < tiers["local"]["experts_stored"] < tiers["local"]["experts_total"] / 2
    assert tiers["remote"]["bytes_fetched"] < model_bytes / 2
    assert tiers["local"]["disk_bytes"] < model_bytes / 2  # the experts not fetched are holes

    record = tmp_path / "run.json"
    record.write_text(json.dumps(first))
    assert main(["stats", str(record)]) == 0
    assert "remote: " in capsys.readouterr().out

    hub.stop()  # the server is gone: the same run works from the local store, fetching nothing
    assert main(["run", REPO, "--remote", "--local-store", store, *PROMPT]) == 0
    out = capsys.readouterr()
    assert (
        "moepager: warning:" in out.err and "using the local store" in out.err
    )  # one line, as CLI warnings are
    second = json.loads(out.out)
    assert second["token_ids"] == local["token_ids"]
    assert second["stats"]["tiers"]["remote"]["bytes_fetched"] == 0
    _offline(monkeypatch)  # and with HF_HUB_OFFLINE set, without trying the network
    third = _run(capsys, REPO, "--remote", "--local-store", store, "--expert-memory", "10%")
    assert third["token_ids"] == local["token_ids"]
    assert RemoteSource(REPO, store).verify() == []


def test_logits_match_transformers(model, hub, tmp_path):
    path, ref = model
    engine = moepager.load(RemoteSource(REPO, tmp_path, progress=False), expert_memory="25%")
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        expected = ref(ids).logits
    assert (engine.logits(ids) - expected).abs().max().item() < 1e-4


def _keys(source, n, layer=0):
    return [(layer, e) for e in range(n)]


def _outs(source, keys):
    return [source.local.read_expert(*keys[0]) for _ in keys]  # tensors of the right shapes, filled below


def _check_experts(source, keys, ref_path):
    ref = Checkpoint(ref_path)
    outs = [{k: torch.zeros_like(v) for k, v in ref.read_expert(*key).items()} for key in keys]
    source.read_experts(keys, outs)
    for key, out in zip(keys, outs):
        for name, t in ref.read_expert(*key).items():
            assert torch.equal(out[name], t), (key, name)


def test_body_cut_mid_expert_resumes_from_the_byte_reached(model, hub, tmp_path):
    source = RemoteSource(REPO, tmp_path, progress=False, backoff=0.01)
    hub.fail("cut", 1)
    hub.ranges.clear()
    keys = _keys(source, 8)
    _check_experts(source, keys, model[0])
    (name, start, end), resumed = hub.ranges[0], hub.ranges[1]
    # the retry asks from the last byte received (some of the cut body may be lost in transit)
    assert resumed[0] == name and start < resumed[1] <= end < resumed[2]
    assert source.tier_stats()["remote"]["retries"] == 1
    assert source.verify() == []


@pytest.mark.parametrize("fault", ["error", "stall", "cut"])
def test_failing_server_gives_a_clear_error_and_a_store_that_verifies(model, hub, tmp_path, fault):
    source = RemoteSource(REPO, tmp_path, progress=False, timeout=0.5, tries=2, backoff=0.01)
    _check_experts(source, [(0, 0), (0, 1)], model[0])  # fetched while the server works
    hub.stall_s = 1.5
    hub.fail(fault)
    with pytest.raises(MoepagerError, match=r"could not fetch .* after 2 tries .*run again"):
        source.read_experts(_keys(source, 6, layer=1), _outs(source, _keys(source, 6, layer=1)))
    assert source.verify() == []
    assert sorted(source.mirror.committed) == [(0, 0), (0, 1)]  # nothing half fetched counts
    hub.fail(None)
    _check_experts(source, _keys(source, 6, layer=1), model[0])  # the next try fetches them


def test_half_written_expert_is_never_used(model, hub, tmp_path):
    """Bytes written without their journal line (a crash between the two), a journal line cut short and a
    damaged one are never taken for an expert: the expert is fetched again."""
    source = RemoteSource(REPO, tmp_path, progress=False)
    _check_experts(source, [(0, 3)], model[0])
    mirror = source.mirror
    piece = mirror.pieces[(1, 5)][0]
    mirror.write(piece.file, piece.offset, memoryview(b"\xff" * piece.nbytes))  # garbage, never committed
    piece = mirror.pieces[(0, 3)][0]
    mirror.write(piece.file, piece.offset, memoryview(b"\x00" * piece.nbytes))  # as if evicted...
    with open(mirror.path / STATE_DIR / JOURNAL, "a") as f:
        f.write("e 0 x\n")  # ...with a damaged eviction line: the expert is checked and dropped
        f.write("c 1 5 12")  # torn: no newline
    mirror.close()
    del source, mirror
    source = RemoteSource(REPO, tmp_path, progress=False)
    assert source.mirror.committed == {}
    _check_experts(source, [(1, 5), (0, 3)], model[0])
    assert source.verify() == []


def test_a_damaged_expert_fails_verify_and_is_fetched_again(model, hub, tmp_path):
    source = RemoteSource(REPO, tmp_path, progress=False)
    _check_experts(source, [(0, 2)], model[0])
    piece = source.mirror.pieces[(0, 2)][0]
    source.mirror.write(piece.file, piece.offset, memoryview(b"\x00" * 16))
    problems = source.verify(repair=True)
    assert len(problems) == 1 and "expert 2 of layer 0" in problems[0]
    _check_experts(source, [(0, 2)], model[0])
    assert source.verify() == []


def test_disk_budget_evicts_least_used_experts_from_disk(model, hub, tmp_path):
    one = Checkpoint(model[0]).expert_nbytes(0, 0)
    source = RemoteSource(REPO, tmp_path, progress=False, disk_budget=6 * one)
    _check_experts(source, [(0, 0)], model[0])
    _check_experts(source, [(0, 0)], model[0])  # used twice: stays
    for e in range(1, 12):
        _check_experts(source, [(1, e)], model[0])
    stats = source.tier_stats()["local"]
    assert stats["stored_bytes"] <= 6 * one and stats["evictions"] == 6
    assert (0, 0) in source.mirror.committed
    full = sum(p.stat().st_size for p in model[0].iterdir())
    assert stats["disk_bytes"] < full / 4  # evicted experts' bytes are holes again
    _check_experts(source, [(1, 1)], model[0])  # an evicted expert comes back
    assert source.verify() == []


def test_fetch_all_makes_a_complete_checkpoint(model, hub, tmp_path, capsys, monkeypatch):
    store = str(tmp_path / "store")
    assert main(["fetch", REPO, "--local-store", store, "--quiet"]) == 0
    assert "128 of 128 experts stored" in capsys.readouterr().out
    snapshot = next((tmp_path / "store").glob("models--org--tiny-moe/snapshots/*"))
    local = _run(capsys, str(model[0]))
    assert _run(capsys, str(snapshot))["token_ids"] == local["token_ids"]  # a plain checkpoint folder now
    for p in model[0].glob("*.safetensors"):
        assert zlib.crc32((snapshot / p.name).read_bytes()) == zlib.crc32(p.read_bytes())
    hub.stop()
    _offline(monkeypatch)
    record = _run(capsys, REPO, "--remote", "--local-store", store)
    assert record["token_ids"] == local["token_ids"]
    assert (
        record["stats"]["tiers"]["local"]["from_local"] == record["stats"]["tiers"]["local"]["expert_reads"]
    )


def test_fetch_hot_routes_a_calibration_text(model, hub, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 128}" for i in range(0, 400, 7)))
    assert main(["fetch", REPO, "--experts", "hot", "--text", str(text), "--local-store", str(tmp_path / "s"),
                 "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    stored = int(out.split(": ")[1].split(" of ")[0])
    assert 0 < stored < 128


def test_clear_errors(hub, tmp_path, capsys, monkeypatch):
    assert main(["run", "org/missing", "--remote", "--local-store", str(tmp_path), *PROMPT]) == 2
    assert "no access to the model org/missing" in capsys.readouterr().err
    assert main(["run", "not a repo", "--remote", *PROMPT]) == 2
    assert "needs a hub model id like ORG/NAME" in capsys.readouterr().err
    _offline(monkeypatch)
    assert main(["run", REPO, "--remote", "--local-store", str(tmp_path), *PROMPT]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_serve_takes_the_remote_options():
    from moepager.cli import build_parser

    args = build_parser().parse_args(["serve", REPO, "--remote", "--disk-budget", "2GiB", "--revision", "v1"])
    assert (args.remote, args.disk_budget, args.revision, args.local_store) == (True, "2GiB", "v1", None)


def test_hf_token_is_sent(model, hub, tmp_path, capsys, monkeypatch):
    hub.token = "hf_secret"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["run", REPO, "--remote", "--local-store", str(tmp_path), *PROMPT]) == 2
    assert "set HF_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert _run(capsys, REPO, "--remote", "--local-store", str(tmp_path))["token_ids"]


@pytest.mark.slow
def test_serve_remote_answers_like_the_local_model(model, hub, tmp_path):
    """`moepager serve ORG/NAME --remote` as a user starts it (loopback, a free port, stopped by its pid):
    experts are fetched as requests route to them, and the answer is the local model's."""
    import urllib.request

    path, _ = model
    local = moepager.load(path)
    ids = local.generate(torch.tensor([1, 2, 3]), max_new_tokens=5, stop_ids=[])
    with serve_process(REPO, "--remote", "--local-store", str(tmp_path / "store")) as base:
        body = {"model": REPO, "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0}
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert out["choices"][0]["text"] == local.tokenizer.decode(ids) and len(ids) == 5
        assert out["choices"][0]["text"].strip()
        assert 0 < hub.bytes_sent < sum(f.stat().st_size for f in path.iterdir())  # not the whole model
