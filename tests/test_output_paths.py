"""Outputs that cannot be written, and prompts that make no sense, are refused before anything is loaded
or written: one line, exit 2. A read-only folder is simulated by os.access (tests run as root, for whom
permission bits do not refuse a write); what moepager must do with that answer is the point here."""

import os

import pytest

from moepager.cli import main


def _refused(argv, capsys, *words) -> None:
    capsys.readouterr()  # what building a tiny model printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("moepager: error:"), err
    for w in words:
        assert w in err, err


@pytest.fixture
def read_only(monkeypatch):
    """Folders for which os.access says not writable, as on a read-only filesystem."""
    folders = set()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (mode & os.W_OK and str(p) in folders)
                        and real(p, mode, **kw))  # fmt: skip
    return folders


@pytest.mark.parametrize("flag", ["--trace", "--session", "--save-hot-set"])
def test_run_output_into_a_missing_folder(flag, tmp_path, capsys):
    # the model does not exist: the output is refused before the model would be looked for
    target = tmp_path / "no" / "such" / "file"
    argv = ["run", str(tmp_path / "model"), "--prompt", "hi", flag, str(target)]
    _refused(argv, capsys, flag, str(tmp_path / "no" / "such"), "does not exist")


@pytest.mark.parametrize("flag", ["--trace", "--session"])
def test_run_output_into_a_read_only_folder(flag, tmp_path, capsys, read_only):
    read_only.add(str(tmp_path / "ro"))
    (tmp_path / "ro").mkdir()
    _refused(["run", str(tmp_path / "model"), "--prompt", "hi", flag, str(tmp_path / "ro" / "out")], capsys,
             flag, "cannot be written")  # fmt: skip
    assert not any((tmp_path / "ro").iterdir())


def test_chat_trace_into_a_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    _refused(["chat", str(tmp_path / "model"), "--trace", str(tmp_path / "f" / "t.json")], capsys, "--trace")


def test_prompt_and_prompt_ids_together(tmp_path, capsys):
    _refused(["run", str(tmp_path / "model"), "--prompt", "hi", "--prompt-ids", "1,2"], capsys,
             "--prompt and --prompt-ids", "one of them")  # fmt: skip


@pytest.mark.parametrize("text", ["", "  \n"])
def test_empty_prompt(text, tmp_path, capsys):
    _refused(["run", str(tmp_path / "model"), "--prompt", text], capsys, "--prompt", "is empty")


def test_convert_onto_a_read_only_folder(tiny, tmp_path, capsys, read_only):
    read_only.add(str(tmp_path / "ro"))
    (tmp_path / "ro").mkdir()
    _refused(["convert", str(tiny("mixtral")[0]), str(tmp_path / "ro" / "new" / "store"), "--quiet"], capsys,
             "store folder", str(tmp_path / "ro"), "cannot be written")  # fmt: skip
    assert not any((tmp_path / "ro").iterdir())  # not even the missing parent was made


def test_convert_under_a_file(tiny, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    _refused(["convert", str(tiny("mixtral")[0]), str(tmp_path / "f" / "store"), "--quiet"], capsys,
             "is a file, not a folder")  # fmt: skip
