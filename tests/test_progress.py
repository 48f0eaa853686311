"""Progress bars are for terminals: piped stderr gets none (a convert once wrote one 30 KB line there)."""

import io
import sys

from moepager.cli import main
from moepager.system.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_only_on_a_terminal(monkeypatch):
    for stream, shown in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress_bar(range(3), desc="count")) == [0, 1, 2]
        assert ("count" in stream.getvalue()) == shown
        stream.truncate(0)
        list(progress_bar(range(3), desc="count", enabled=False))  # --quiet: none even on a terminal
        assert stream.getvalue().strip("\x00") == ""


def test_convert_into_a_pipe_writes_no_bar(tiny, tmp_path, capsys):
    src = tiny("mixtral")[0]
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "store")]) == 0  # no --quiet; capsys is not a terminal
    out, err = capsys.readouterr()
    assert "\r" not in err and "experts" not in err and out.startswith("wrote ")
