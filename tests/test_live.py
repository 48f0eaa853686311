"""The live view: /events (its documented shape, its bounded rate, the heat map moving after a paged request),
the page's assets (served, nothing from the network), and `moepager top` read through a terminal emulator
(pyte) under a pseudo-terminal, attached to a `moepager serve` process."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request

import pytest
from serve_process import serve_process
from tiny_models import build, copy_with_tokenizer

import moepager
from moepager.serving.live import EVENT_VERSION, LIVE_HZ, MEMORY_CATEGORIES, STATES
from moepager.serving.server import create_app

CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
)
LAYERS, EXPERTS = 8, 16


@pytest.fixture(scope="module")
def paged_dir(tmp_path_factory):
    """A tiny Mixtral of 8 layers x 16 experts (top 2), with a word tokenizer and a chat template."""
    root = tmp_path_factory.mktemp("live")
    build("mixtral", root / "m", num_hidden_layers=LAYERS, num_local_experts=EXPERTS)
    return copy_with_tokenizer(root / "m", root / "served", CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def server(paged_dir):
    from test_server import _serving

    engine = moepager.load(paged_dir, expert_memory="25%")
    with _serving(create_app(engine, "tiny")) as base:
        yield base


class Events:
    """A client of /events on a thread: every event received, with its arrival time."""

    def __init__(self, base: str):
        self.response = urllib.request.urlopen(base + "/events", timeout=30)
        self.got: list[tuple[float, dict]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for line in self.response:
                if line.startswith(b"data:"):
                    self.got.append((time.monotonic(), json.loads(line[5:])))
        except (OSError, ValueError, AttributeError):  # closed by the test (http.client then loses its file)
            pass

    def wait(self, pred, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, ev in list(self.got):
                if pred(ev):
                    return ev
            time.sleep(0.05)
        raise AssertionError(f"no event matched within {timeout} s; the last: {self.got[-1:]}")

    def close(self):
        self.response.close()


def _complete(base: str, max_tokens: int = 24) -> dict:
    body = json.dumps({"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": max_tokens, "temperature": 1.0,
                       "seed": 0}).encode()  # fmt: skip
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def test_events_have_the_documented_shape_and_the_heat_map_moves(server):
    events = Events(server)
    try:
        idle = events.wait(lambda ev: True)
        assert idle["version"] == EVENT_VERSION and idle["model"] == "tiny"
        assert set(idle) >= {"seq", "time", "interval_s", "speed", "experts", "memory", "requests", "heat"}
        heat = idle["heat"]
        assert heat["layers"] == list(range(LAYERS)) and heat["experts"] == EXPERTS
        assert all(len(row) == EXPERTS and set(row) <= set(STATES) for row in heat["rows"])
        assert tuple(idle["memory"]["categories"]) == MEMORY_CATEGORIES
        assert idle["memory"]["rss_bytes"] > 0 and idle["experts"]["capacity"] == LAYERS * EXPERTS // 4
        before = idle["experts"]["misses"]
        out = _complete(server)
        assert out["usage"]["completion_tokens"] == 24
        # the request's misses show: counted, and drawn as misses in the heat map of some event
        moved = events.wait(
            lambda ev: ev["experts"]["misses"] > before and "m" in "".join(ev["heat"]["rows"])
        )
        assert moved["seq"] > idle["seq"]
        after = events.wait(lambda ev: ev["speed"]["decode_tokens"] >= 23)
        assert after["speed"]["time_to_first_token_s"] > 0 and after["requests"]["mean_batch"] >= 1
        # reads happened: bytes and rates come from the cache's own counters
        assert (
            after["experts"]["bytes_read"] > 0 and after["experts"]["hits"] + after["experts"]["misses"] > 0
        )
        # resident-and-idle cells are never more than the cache's slots (activity cells may since have left it)
        assert (
            sum(row.count("r") + row.count("p") for row in after["heat"]["rows"])
            <= after["experts"]["capacity"]
        )
    finally:
        events.close()


def test_events_are_pushed_at_a_bounded_rate(server):
    events = Events(server)
    try:
        time.sleep(3.0)
    finally:
        events.close()
    times = [t for t, _ in events.got]
    assert len(times) >= 4
    span = times[-1] - times[0]
    assert (len(times) - 1) / span <= LIVE_HZ * 1.5  # a bound on the rate, not a timing of the code
    seqs = [ev["seq"] for _, ev in events.got]
    assert seqs == sorted(seqs)


def test_the_page_and_its_assets_are_served_and_load_nothing_from_the_network(server):
    page = urllib.request.urlopen(server + "/").read().decode()
    assert "<canvas" in page and "/static/live.js" in page
    for name in ("live.js", "live.css"):
        r = urllib.request.urlopen(f"{server}/static/{name}")
        assert r.status == 200 and r.headers["content-type"].startswith(("text/javascript", "text/css"))
        text = r.read().decode()
        assert not re.search(r"https?://|//cdn|@import", text), name
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server + "/static/missing.js")
    assert e.value.code == 404


def test_resident_experts_have_no_heat_map(tiny):
    from test_server import _serving

    engine = moepager.load(tiny("mixtral")[0])
    with _serving(create_app(engine, "tiny")) as base:
        events = Events(base)
        try:
            ev = events.wait(lambda ev: True)
        finally:
            events.close()
    assert ev["heat"] is None and ev["experts"] is None
    assert (
        ev["memory"]["categories"]["expert_cache"] > 0
        and ev["memory"]["categories"]["expert_read_staging"] == 0
    )


def test_a_client_that_skips_events_still_sees_what_happened_in_them(paged_dir):
    """A client too slow for LIVE_HZ gets the newest event, its heat map merged with the one it skipped."""
    import asyncio

    from moepager.generation.batching import Scheduler
    from moepager.serving.live import LiveFeed

    engine = moepager.load(paged_dir, expert_memory="25%")
    feed = LiveFeed(engine, Scheduler(engine), "tiny", interval=0.05)

    async def slow_client() -> tuple[dict, dict]:
        events = feed.subscribe()
        first = await anext(events)
        # decoding on the loop's thread: the feed ticks only afterwards, the first tick with the misses, then
        # ticks with none while this client does not read
        engine.generate([1, 2, 3], max_new_tokens=16, temperature=1.0, seed=3, stop_ids=[])
        await asyncio.sleep(0.5)
        got = await anext(events)
        await events.aclose()
        return first, got

    first, got = asyncio.run(slow_client())
    assert got["seq"] >= first["seq"] + 3  # events were skipped
    assert "m" in "".join(got["heat"]["rows"])  # the decode's misses, drawn in an event it skipped


# ------------------------------------------------------------------------------------------------ moepager top


class Terminal:
    """A process on a pseudo-terminal of rows x cols, its screen kept by pyte."""

    def __init__(self, args: list[str], rows: int = 24, cols: int = 100):
        import pyte

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env["TERM"] = "xterm-256color"
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.master], [], [], min(left, 0.1))[0]:
                try:
                    self.stream.feed(os.read(self.master, 65536))
                except OSError:  # the process closed the terminal
                    return

    def wait_for(self, pred, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.2)
            if pred(self.text()):
                return self.text()
            assert self.proc.poll() is None, f"top exited ({self.proc.returncode}):\n{self.text()}"
        raise AssertionError(f"the screen never matched within {timeout} s:\n{self.text()}")

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.mark.slow
def test_top_draws_the_panel_of_a_live_server_and_answers_its_keys(paged_dir):
    with serve_process(str(paged_dir), "--model-name", "tiny", "--expert-memory", "25%") as base:
        term = Terminal([sys.executable, "-m", "moepager", "top", base], rows=20, cols=90)
        try:
            # 20 lines leave room for fewer than 4 layer rows: the minimum of 4 are shown
            screen = term.wait_for(lambda s: "heat map: layers 0-3 of 8" in s)
            assert "model tiny" in screen and "hit rate" in screen and "memory:" in screen
            out = _complete(base, max_tokens=32)
            assert out["usage"]["completion_tokens"] == 32
            # the request's reads reach the screen: the disk rate is no longer zero at some point
            term.wait_for(lambda s: re.search(r"disk (?!0\.0 )[\d.]+ MB/s", s) is not None)
            term.send("]")  # the next layer range
            term.wait_for(lambda s: "heat map: layers 4-7 of 8" in s)
            term.send("[")
            term.wait_for(lambda s: "heat map: layers 0-3 of 8" in s)
            term.send("p")
            paused = term.wait_for(lambda s: "paused" in s)
            event = re.search(r"event (\d+)", paused)[1]
            term.pump(1.5)  # events keep coming; a paused panel does not draw them
            assert re.search(r"event (\d+)", term.text())[1] == event
            term.send("p")
            term.wait_for(lambda s: "live" in s and re.search(r"event (\d+)", s)[1] != event)
            term.send("q")
            deadline = time.monotonic() + 10
            while term.proc.poll() is None and time.monotonic() < deadline:
                term.pump(0.1)
            assert term.proc.returncode == 0, term.text()
        finally:
            term.close()


def test_top_refuses_a_pipe_and_a_bad_url(capsys):
    from moepager.cli import main as cli_main

    assert cli_main(["top", "127.0.0.1:8000"]) == 2
    assert "not an http:// URL" in capsys.readouterr().err
    assert cli_main(["top", "http://127.0.0.1:9"]) == 2  # pytest's stdin is not a terminal
    assert "draws on a terminal" in capsys.readouterr().err
