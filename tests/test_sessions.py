"""Session files: resuming equals never having stopped, the saved prefix is not recomputed, and files from
another model, other weights, another format, or damaged ones are refused with a clear error."""

import json
import shutil
import struct

import pytest
import torch
from tiny_models import VOCAB

import moepager
from moepager.cli import main
from moepager.errors import CorruptFile
from moepager.generation.sessions import StaleSession
from moepager.model.layers import KVCache


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_resume_gives_the_same_continuation_as_never_stopping(tiny, family, tmp_path):
    path = tiny(family)[0]
    prompt = _prompt(40, 1)
    expected = moepager.load(path).generate(prompt, 30, stop_ids=[])
    # a budget below the session's size: the cache spills while generating and again while loading
    engine = moepager.load(path, kv_memory="8KiB", kv_block_size=16, kv_spill_dir=tmp_path)
    session = tmp_path / "chat.session"
    first = list(engine.stream_session(session, prompt, 12, stop_ids=[]))
    assert session.exists() and engine.session_reused_tokens == 0
    before = engine.timings.prefill_tokens
    second = list(engine.stream_session(session, prompt + first, 18, stop_ids=[]))
    assert first + second == expected
    assert (
        engine.session_reused_tokens == len(prompt) + len(first) - 1
    )  # all but the last id, never in the cache
    assert engine.timings.prefill_tokens - before == 1  # the prefix was not recomputed


def test_diverging_prompt_reuses_only_the_shared_prefix(tiny, tmp_path):
    path = tiny("gpt_oss")[0]
    engine = moepager.load(path)
    session = tmp_path / "s"
    list(engine.stream_session(session, _prompt(50, 2), 5, stop_ids=[]))
    other = _prompt(50, 2)[:21] + _prompt(15, 3)
    got = list(engine.stream_session(session, other, 10, stop_ids=[]))
    assert engine.session_reused_tokens == 21
    assert got == moepager.load(path).generate(other, 10, stop_ids=[])


def test_save_and_load_api_with_the_in_ram_cache(tiny, tmp_path):
    engine = moepager.load(tiny("mixtral")[0])
    ids = torch.tensor(_prompt(30, 4))
    cache = KVCache(engine.config.num_layers)
    with torch.inference_mode():
        engine.model(ids[None, :20], cache)
    engine.save_session(tmp_path / "s", cache, ids[:20].tolist())
    loaded, token_ids = engine.load_session(tmp_path / "s")
    assert token_ids == ids[:20].tolist() and loaded.seq_len == 20
    with torch.inference_mode():
        got = engine.model(ids[None, 20:], loaded)
    assert (got - engine.logits(ids[None])[:, 20:]).abs().max().item() < 1e-5
    assert not list(tmp_path.glob(".s.tmp-*"))  # the temp file was renamed into place


@pytest.fixture()
def saved(tiny, tmp_path):
    path = tiny("mixtral")[0]
    engine = moepager.load(path)
    session = tmp_path / "chat.session"
    list(engine.stream_session(session, _prompt(20, 5), 4, stop_ids=[]))
    return engine, session


def test_other_model_is_refused(tiny, saved):
    _, session = saved
    other = moepager.load(tiny("qwen2_moe")[0])
    with pytest.raises(StaleSession, match="different model or different weights"):
        other.load_session(session)


def test_changed_weights_are_refused(tiny, saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, session = saved
    changed = tmp_path / "changed"
    shutil.copytree(tiny("mixtral")[0], changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] += 1e-3
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StaleSession, match="different model or different weights"):
        moepager.load(changed).load_session(session)


def test_other_dtype_is_refused(tiny, saved):
    _, session = saved
    with pytest.raises(StaleSession):
        moepager.load(tiny("mixtral")[0], dtype="bfloat16").load_session(session)


def test_version_mismatch_is_refused(saved):
    engine, session = saved
    data = bytearray(session.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    session.write_bytes(bytes(data))
    with pytest.raises(StaleSession, match="format_version 99"):
        engine.load_session(session)


def test_corrupt_payload_is_refused(saved):
    engine, session = saved
    data = bytearray(session.read_bytes())
    data[len(data) // 2] ^= 0xFF
    session.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="checksum"):
        engine.load_session(session)


def test_truncated_file_is_refused(saved):
    engine, session = saved
    session.write_bytes(session.read_bytes()[:-100])
    with pytest.raises(CorruptFile, match="truncated"):
        engine.load_session(session)


def test_not_a_session_file_is_refused(saved):
    engine, session = saved
    session.write_bytes(b"hello world, not a session")
    with pytest.raises(CorruptFile, match="not a moepager session"):
        engine.load_session(session)


def test_cli_session_resumes_and_reports_errors_in_one_line(tiny, tmp_path, capsys):
    path = str(tiny("mixtral")[0])
    session = str(tmp_path / "cli.session")
    prompt = _prompt(12, 6)
    ids = ",".join(map(str, prompt))
    assert main(["run", path, "--prompt-ids", ids, "--max-tokens", "4", "--json", "--session", session]) == 0
    first = json.loads(capsys.readouterr().out)
    more = ",".join(map(str, prompt + first["token_ids"]))
    argv = ["run", path, "--prompt-ids", more, "--max-tokens", "4", "--json", "--session", session, "--kv-memory",
            "4KiB", "--prefill-chunk", "3"]  # fmt: skip
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["stats"]["session_reused_tokens"] == 15 and second["stats"]["prefill_tokens"] == 1
    expected = moepager.load(path).generate(prompt, 8)
    assert first["token_ids"] + second["token_ids"] == expected
    (tmp_path / "cli.session").write_bytes((tmp_path / "cli.session").read_bytes()[:50])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and err.count("\n") == 1
