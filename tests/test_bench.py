"""The benchmark harness end to end on tiny models (a checkpoint folder and a GGUF file): one budget, no
cgroup, no root needed.

Nothing here asserts a speed: only that every run happened and that the records, the table and the
summary hold what the report promises, and that every engine samples (seeded) unless told to be greedy.
"""

import json
import sys

import gguf
import pytest
from test_gguf import write_gguf
from tiny_models import VOCAB

from moepager.bench import BenchOptions, budget_bytes, main, resolve_model, write_naive_files, write_outputs
from moepager.bench.limits import disk_bandwidth
from moepager.bench.report import markdown, summarize
from moepager.bench.worker import run as run_worker
from moepager.cli import build_parser
from moepager.errors import MoepagerError


def _options(model, tmp_path, **kw) -> BenchOptions:
    kw = {"budgets": ["50%"], "rounds": 1, "tokens": 3, "prompt_tokens": 4, "peers": [], **kw}
    return BenchOptions(model=str(model), use_cgroup=False, drop_caches=False, work_dir=str(tmp_path / "work"),
                        out=str(tmp_path / "results"), command="test", **kw)  # fmt: skip


def test_bench_smoke_on_tiny_model(tiny, tmp_path):
    path, _ = tiny("mixtral")
    record = main(_options(path, tmp_path, tokens=8, name="tiny"))
    assert record["options"]["temperature"] == 1.0 and record["options"]["seed"] == 0  # sampled by default
    assert record["sampling"] == "temperature 1, seed 0" and "temperature 1, seed 0" in markdown(record)
    runs = {r["engine"]: r for r in record["runs"]}
    assert runs["resident"]["status"] == "ok", runs["resident"]
    assert runs["resident"]["decode_tokens"] == 7 and len(runs["resident"]["token_ids"]) == 8
    assert runs["resident"]["memory"]["method"].startswith("rss+fincore")
    mp = runs["moepager"]
    if mp["status"] == "skipped":  # a build without the expert cache still benchmarks what it has
        assert "paging" in mp["message"]
    else:
        assert mp["status"] == "ok", mp
        assert mp["token_ids"] == runs["resident"]["token_ids"]  # paging is exact
        assert 0 <= mp["expert"]["hit_rate"] <= 1 and mp["expert"]["bytes_read_per_token"] >= 0
        assert "50%" in record["summary"]["limits"]
    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert saved["runs"] and saved["machine"]["torch"] and saved["bandwidth"]
    assert "| budget |" in (tmp_path / "results" / "tiny.md").read_text()


def test_summary_limit_and_ratios():
    run = lambda engine, rate, read=None, rnd=0: {
        "engine": engine, "budget": "25%", "round": rnd, "status": "ok", "decode_tokens_per_s": rate,
        "expert": {"bytes_read_per_token": read, "hit_rate": 0.5, "wait_fraction": 0.1} if read else None,
        "memory": {"peak_bytes": 1 << 30, "failcnt": 0},
    }  # fmt: skip
    runs = [
        run("resident", 10.0),
        run("moepager", 2.0, 1e9),
        run("moepager", 4.0, 1e9, 1),
        run("accelerate", 0.1),
        {"engine": "llamacpp", "budget": "25%", "round": 0, "status": "skipped", "message": "not installed"},
    ]
    s = summarize(runs, bandwidth=[2e9, 2e9])
    lim = s["limits"]["25%"]
    assert lim["bound"] == "disk" and lim["floor_s_per_token"] == pytest.approx(0.5)
    assert lim["efficiency"] == pytest.approx(0.5 / (1 / 3.0))  # median of 2 and 4 tok/s
    assert s["ratios"]["25%"]["moepager_over_accelerate"] == pytest.approx(30.0)
    record = {"workload": "w", "command": "c", "model": {"description": "d"}, "machine_line": "m",
              "options": {"rounds": 2, "prompt_tokens": 4, "tokens": 3}, "summary": s}  # fmt: skip
    table = markdown(record)
    assert "not installed" in table and "30.00x" in table


def test_without_matplotlib_no_plot_is_claimed(tmp_path, monkeypatch, capsys):
    """matplotlib is optional for bench: without it the json and md are written, no png, and the log
    names only the files that exist."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    record = {"workload": "w", "command": "c", "model": {"description": "d"}, "machine_line": "m",
              "options": {"rounds": 1, "prompt_tokens": 4, "tokens": 3},
              "summary": summarize([], bandwidth=[1e9])}  # fmt: skip
    written = write_outputs(record, tmp_path / "r")
    assert [f.name for f in written] == ["r.json", "r.md"] and not (tmp_path / "r.png").exists()
    assert all(f.stat().st_size > 0 for f in written)
    assert "matplotlib is not installed: no plot" in capsys.readouterr().err


def test_budget_parsing_and_bandwidth(tmp_path):
    assert budget_bytes("25%", 1000) == 250 and budget_bytes("1MiB", 10) == 1 << 20
    with pytest.raises(MoepagerError):
        budget_bytes("150%", 1000)
    f = tmp_path / "blob"
    f.write_bytes(b"\1" * (1 << 20))
    bw = disk_bandwidth([f], total_bytes=1 << 20, request=256 << 10, threads=2)
    assert bw["bytes"] > 0 and bw["bytes_per_s"] > 0


def test_every_torch_engine_samples_seeded_and_greedy_stays_greedy(tiny, tmp_path):
    """In-process worker runs (no child, no cgroup): sampled routing varies, the same seed repeats the
    tokens, temperature 0 is the old greedy decode (which on random weights soon repeats one token)."""
    path, _ = tiny("mixtral")
    naive = write_naive_files(path, tmp_path / "naive", None)
    base = {"model": str(path), "budget": "50%", "prompt": [5, 6, 7, 8], "tokens": 10, "dtype": None,
            "engine_options": {}, "naive_dir": str(naive), "offload_dir": str(tmp_path / "offload"),
            "accelerate_cpu_bytes": 1 << 30, "threads": None}  # fmt: skip
    ids = {}
    for engine in ("resident", "moepager", "naive", "accelerate"):
        for temperature, seed in ((1.0, 0), (1.0, 1), (0.0, 0)):
            out = run_worker({**base, "engine": engine, "temperature": temperature, "seed": seed})
            assert out["status"] == "ok", out
            ids[engine, temperature, seed] = out["token_ids"]
        sampled, greedy = ids[engine, 1.0, 0], ids[engine, 0.0, 0]
        assert len(sampled) == 10 and len(set(sampled)) >= 5, (engine, sampled)  # varied tokens and routing
        assert sampled != greedy and sampled != ids[engine, 1.0, 1], engine
    # one sampler, one seed, the same logits: the same tokens (paging and naive loading are exact)
    assert ids["moepager", 1.0, 0] == ids["naive", 1.0, 0] == ids["resident", 1.0, 0]
    assert ids["moepager", 0.0, 0] == ids["resident", 0.0, 0] == ids["accelerate", 0.0, 0]
    rerun = run_worker({**base, "engine": "resident", "temperature": 1.0, "seed": 0})
    assert rerun["token_ids"] == ids["resident", 1.0, 0]  # seeded: a rerun repeats the tokens


class _WriterWithVocab(gguf.GGUFWriter):
    """write_gguf's writer plus a plain word vocabulary, which llama.cpp needs to load the file."""

    def write_header_to_file(self, *args, **kwargs):
        self.add_tokenizer_model("llama")
        self.add_token_list([f"w{i}" for i in range(VOCAB)])
        self.add_token_scores([0.0] * VOCAB)
        self.add_token_types([1] * VOCAB)
        return super().write_header_to_file(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gguf") / "mixtral.gguf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFWriter", _WriterWithVocab)
        write_gguf(tiny("mixtral")[0], out)
    return out


def test_bench_on_a_gguf_file(tiny_gguf, tmp_path):
    """MODEL is a GGUF: moepager and llama.cpp run that very file; naive and accelerate are skipped."""
    opts = _options(tiny_gguf, tmp_path, tokens=6, peers=["naive", "accelerate", "llamacpp"], name="g")
    record = main(opts)
    m = record["model"]
    assert (
        m["format"] == "gguf" and "GGUF, experts F32" in m["description"] and m["files"] == [str(tiny_gguf)]
    )
    assert (
        m["dense_bytes"] == tiny_gguf.stat().st_size - m["expert_bytes"]
    )  # what --memory-cap auto plans from
    assert record["llamacpp_gguf"] == str(tiny_gguf) and record["prompt_source"].startswith(
        "random token ids"
    )
    runs = {r["engine"]: r for r in record["runs"]}
    for engine in ("resident", "moepager"):
        assert runs[engine]["status"] == "ok", runs[engine]
        assert len(set(runs[engine]["token_ids"])) > 1
    assert runs["moepager"]["token_ids"] == runs["resident"]["token_ids"]
    for peer in ("naive", "accelerate"):
        assert (
            runs[peer]["status"] == "skipped"
            and "needs a Hugging Face checkpoint folder" in runs[peer]["message"]
        )
    table = (tmp_path / "results" / "g.md").read_text()
    assert "needs a Hugging Face checkpoint folder" in table and "(GGUF, experts F32)" in table
    assert (tmp_path / "results" / "g.png").stat().st_size > 0
    lc = runs["llamacpp"]
    if lc["status"] == "skipped":  # llama-cpp-python is an optional peer
        assert "llama-cpp-python is not installed" in lc["message"] and "llama-cpp-python" in table
    else:
        assert lc["status"] == "ok", lc
        assert lc["gguf"] == str(tiny_gguf) and len(lc["token_ids"]) == 6 and len(set(lc["token_ids"])) > 1
        assert "| 50% | none | llamacpp |" in table and "moepager / llamacpp" in table
        assert "moepager_over_llamacpp" in record["summary"]["ratios"]["50%"]


def test_model_and_cli_checks(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"x")
    for model in (bad, tmp_path):  # a file that is not .gguf; a folder without config.json
        with pytest.raises(MoepagerError):
            resolve_model(str(model))
    args = build_parser().parse_args(["bench", "m.gguf"])
    opts = BenchOptions.from_cli(args)
    assert (opts.temperature, opts.seed, opts.tokenizer, opts.gguf) == (1.0, 0, None, None)
    with pytest.raises(MoepagerError, match="temperature"):
        BenchOptions.from_cli(build_parser().parse_args(["bench", "m.gguf", "--temperature", "-1"]))


def test_a_resident_run_whose_weights_pass_the_cap_is_not_started():
    """Under a cgroup cap below the model's weights every expert resident only thrashes: skipped, saying why."""
    from moepager.bench import resident_cannot_fit

    info = {"dense_bytes": 2 << 30, "expert_bytes": 15 << 30}
    why = resident_cannot_fit(info, 8 << 30)
    assert why.startswith("every expert resident needs 17.0 GiB of weights, more than the 8.0 GiB cap")
    assert resident_cannot_fit(info, 18 << 30) is None and resident_cannot_fit(info, None) is None
