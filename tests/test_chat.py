"""`moepager chat`: history and KV reuse against a fresh computation, slash commands, piped stdin, a terminal."""

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from tiny_models import copy_with_tokenizer

import moepager
from moepager.cli import main
from moepager.cli.chat import Conversation
from moepager.cli.chat import main as chat_main

# word tokens w1..w3 mark the turns, so the tiny word-level tokenizer encodes the whole conversation
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w1 {% else %}w2 {% endif %}{{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}w3{% endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def chat_model(tiny, tmp_path_factory):
    return copy_with_tokenizer(tiny("qwen3_moe")[0], tmp_path_factory.mktemp("chat"), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def engine(chat_model):
    return moepager.load(chat_model, expert_memory="50%")


def _conversation(engine, max_tokens=5) -> Conversation:
    return Conversation(engine, max_tokens, {"temperature": 0.0}, engine.config.max_position_embeddings)


@pytest.mark.parametrize("kv", ["in RAM", "spilled"])
def test_second_turn_reuses_the_cache_and_matches_a_fresh_conversation(engine, chat_model, kv):
    if kv == "spilled":  # blocks of 4 positions, 1 KiB in RAM: most of the conversation lives on disk
        engine = moepager.load(chat_model, expert_memory="50%", kv_memory=1024, kv_block_size=4)
    conv = _conversation(engine)
    first = "".join(conv.reply("w5 w6 w7"))
    assert first and conv.messages[-1] == {"role": "assistant", "content": first}
    held = len(conv.cached_ids)
    second = "".join(conv.reply("w8"))
    assert len(conv.cached_ids) > held  # the cache grew: the first turn was not computed again
    fresh = _conversation(engine)
    fresh.messages = conv.messages[:2]
    assert "".join(fresh.reply("w8")) == second  # computed from scratch: the same reply


def test_interrupted_reply_keeps_what_was_shown_and_the_next_turn_works(engine):
    conv = _conversation(engine)
    pieces = conv.reply("w5 w6")
    shown = next(pieces)
    pieces.close()  # as Ctrl-C would, in the middle of the answer
    assert conv.messages[-1]["content"] == shown and conv.cache is None
    assert "".join(conv.reply("w9"))


def _piped(text: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(text), encoding="utf-8")


def test_piped_lines_are_turns_and_commands_work(engine):
    out, err = io.StringIO(), io.StringIO()
    conv = _conversation(engine)
    chat_main(conv, _piped(b"w5 w6\n\n/stats\nw7\n/reset\n/nonsense\nw8\n/exit\nw9\n"), out, err)
    replies = out.getvalue().splitlines()
    assert len(replies) == 3 and all(r.strip() for r in replies)  # w9 after /exit is never read
    log = err.getvalue()
    assert "1 turns" in log and "tok/s" in log and "hit rate" in log and "(conversation reset)" in log
    assert "unknown command /nonsense" in log
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]  # reset: only the last turn is left


def test_cli_chat_from_a_pipe_and_bad_utf8(chat_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", _piped(b"w5 w6\nw7\n"))
    assert main(["chat", str(chat_model), "--max-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    # a line that is not UTF-8 is refused, named, and the lines after it are still answered
    monkeypatch.setattr(sys, "stdin", _piped(b"w5\n\xffw6\nw7\n"))
    assert main(["chat", str(chat_model), "--max-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    refused = [line for line in err.splitlines() if line.startswith("moepager: error:")]
    assert len(refused) == 1 and refused[0].startswith(
        "moepager: error: stdin line 2 is not valid UTF-8 (byte 0xff"
    )


def _read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    seen, end = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout} s; got {seen[-400:]!r}")
        seen += os.read(fd, 4096)
    return seen


@pytest.mark.slow
def test_chat_under_a_terminal(chat_model):
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "moepager", "chat", str(chat_model), "--max-tokens", "4"],
                            stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)  # fmt: skip
    os.close(follower)
    try:
        assert b"/reset" in _read_until(leader, b">>> ")  # the banner names the commands
        os.write(leader, b"w5 w6\n")
        reply = _read_until(leader, b">>> ").decode()
        assert "w" in reply.split("w5 w6", 1)[1]  # the echoed line, then the streamed reply
        os.write(leader, b"/stats\n")
        assert b"tok/s" in _read_until(leader, b">>> ")
        os.write(leader, b"/reset\n")
        assert b"(conversation reset)" in _read_until(leader, b">>> ")
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
