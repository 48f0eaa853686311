"""The command line's surface: --version, defaults in --help, the summary line after run, and bad input
refused with one line, exit 2 and nothing written."""

import argparse
import json
import re
import shutil

import pytest
from tiny_models import copy_with_tokenizer

import moepager
from moepager.cli import build_parser, main


@pytest.fixture(scope="module")
def model_with_tokenizer(tiny, tmp_path_factory):
    return copy_with_tokenizer(tiny("mixtral")[0], tmp_path_factory.mktemp("with_tok"))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moepager {moepager.__version__}"


def test_every_option_shows_its_default():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        helps = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)) or action.required:
                continue  # a flag is off unless given; a required value has no default
            text = parser._get_formatter()._get_help_string(action) or ""
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert "default:" in text, f"{where}: its help does not state the default"
            if action.default is not None:
                assert str(action.default) in helps, where


def test_run_prints_a_summary_line_on_stderr(model_with_tokenizer, capsys):
    argv = [
        "run",
        str(model_with_tokenizer),
        "--prompt",
        "w1 w2",
        "--max-tokens",
        "6",
        "--expert-memory",
        "50%",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for field in ("decode", "prefill", "tok/s", "hit rate", "prefetch hits", "MiB read per decoded token",
                  "peak memory", "before weights", "after the first token"):  # fmt: skip
        assert field in err, err
    floor = re.search(r"runtime ([\d.]+) MiB before weights, ([\d.]+) MiB after the first token", err)
    assert floor and 0 < float(floor[1]) <= float(floor[2]), err
    assert main(["run", str(model_with_tokenizer), "--prompt-ids", "1,2", "--max-tokens", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["token_ids"] and "experts all resident" in err  # --json too, stdout stays JSON


def _refused(argv, capsys, *words) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("moepager: error:"), err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--device", "tpu"], ["'tpu'", "cpu or cuda"]),
        (["--max-tokens", "0"], ["--max-tokens 0", "at least 1"]),
        (["--max-tokens", "-1"], ["--max-tokens -1", "at least 1"]),
        (["--temperature", "-1"], ["--temperature -1", ">= 0"]),
        (["--temperature", "nan"], ["--temperature nan"]),
        (["--top-p", "2"], ["--top-p 2", "(0, 1]"]),
        (["--top-k", "-3"], ["--top-k -3"]),
        (["--max-context", "0"], ["--max-context 0"]),
    ],
)
def test_bad_options_are_refused_before_loading(flags, words, tmp_path, capsys):
    session = tmp_path / "s.session"
    # the model does not exist: these are refused before it would be looked for
    _refused(
        ["run", str(tmp_path / "nope"), "--prompt", "hi", "--session", str(session), *flags], capsys, *words
    )
    assert not session.exists()


def test_chat_refuses_the_same_options(tmp_path, capsys):
    _refused(["chat", str(tmp_path / "nope"), "--top-p", "2"], capsys, "--top-p 2")


def test_max_tokens_past_the_context(model_with_tokenizer, tmp_path, capsys):
    session, trace = tmp_path / "s.session", tmp_path / "t.json"
    argv = ["run", str(model_with_tokenizer), "--prompt", "w1 w2 w3", "--max-tokens", "300", "--session",
            str(session), "--trace", str(trace)]  # fmt: skip
    _refused(argv, capsys, "--max-tokens 300", "context of 256 tokens", "--max-tokens 253 or less")
    assert not session.exists() and not trace.exists()


def test_prompt_with_invalid_utf8(model_with_tokenizer, capsys):
    # how Python hands over argv bytes that are not UTF-8 (surrogate escapes), e.g. from "$(cat latin1.txt)"
    text = b"caf\xe9".decode("utf-8", "surrogateescape")
    _refused(
        ["run", str(model_with_tokenizer), "--prompt", text], capsys, "--prompt is not valid UTF-8", "0xe9"
    )


@pytest.mark.parametrize("key, value", [("hidden_size", "lots"), ("num_hidden_layers", 2.5), ("rope_theta", "x"),
                                        ("num_local_experts", True), ("vocab_size", 0)])  # fmt: skip
def test_config_with_a_wrongly_typed_value(tiny, tmp_path, capsys, key, value):
    shutil.copytree(tiny("mixtral")[0], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _refused(["run", str(tmp_path), "--prompt-ids", "1"], capsys, f"{key} is {value!r}", "config.json")
