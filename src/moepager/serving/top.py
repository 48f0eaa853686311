"""`moepager top [URL]`: the live view's panel in a terminal, attached to a running `moepager serve`.

Owns reading the server's event stream (GET /events, server-sent events; the shape is docs/live.md) on a
thread, drawing the newest event with rich (speed, the expert cache's rates, the heat map of a range of
layers, memory in `plan`'s categories, the requests), and the keys: up/down or k/j (also [ and ]) move the
layer range, left/right or h/l the expert range when the map is wider than the terminal, p or space pause,
q quit. It computes nothing itself: every number is the server's.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..system.sizes import format_bytes

STYLES = {
    "m": "red1",
    "f": "blue1",
    "h": "green3",
    "p": "magenta",
    "r": "grey62",
    "e": "orange1",
    ".": "grey23",
}
NAMES = {
    "m": "miss",
    "f": "prefetched",
    "h": "hit",
    "p": "pinned",
    "r": "resident",
    "e": "evicted",
    ".": "absent",
}
FIXED_LINES = 17  # lines the panel uses besides the heat map's rows (header, tiles, legend, memory, requests)


@dataclass
class View:
    """What the keys change: the first layer row and expert column shown, and whether drawing is paused."""

    first_layer: int = 0
    first_expert: int = 0
    paused: bool = False


class EventReader:
    """Reads URL/events on a thread and keeps the newest event; reconnects every second when it cannot."""

    def __init__(self, url: str):
        self.url = url.rstrip("/").removesuffix("/v1") + "/events"
        self.latest: dict | None = None
        self.error: str | None = None
        self.count = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="moepager-top-events", daemon=True)

    def start(self) -> EventReader:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=30) as r:
                    self.error = None
                    for line in r:
                        if self._stop.is_set():
                            return
                        if line.startswith(b"data:"):
                            self.latest = json.loads(line[5:])
                            self.count += 1
            except (OSError, urllib.error.URLError, ValueError) as e:
                self.error = f"cannot read {self.url}: {getattr(e, 'reason', e)}; retrying"
            self._stop.wait(1.0)


# ------------------------------------------------------------------------------------------------ drawing


def _fmt(v, digits: int = 1, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def _bytes(n) -> str:
    return "-" if n is None else format_bytes(n)


def heat_rows(height: int) -> int:
    """Layer rows that fit a terminal of `height` lines (at least 4)."""
    return max(4, height - FIXED_LINES)


def render(
    event: dict | None, view: View, width: int, height: int, url: str, error: str | None = None
) -> Group:
    """The panel for one event, sized to a width x height terminal."""
    state = "paused" if view.paused else "live"
    head = Text.assemble(
        ("moepager top", "bold"), f"  {url}  ", (state, "bold green" if state == "live" else "bold yellow")
    )
    keys = Text("up/down [ ] layers  left/right experts  p pause  q quit", style="grey50")
    if event is None:
        return Group(head, keys, Text(error or "waiting for the first event...", style="yellow"))
    head.append(f"  model {event['model']}  event {event['seq']}")
    if error:  # the stream broke: the numbers below are the last ones received
        head.append(f"  {error}", style="yellow")
    s, x, m, r = event["speed"], event.get("experts") or {}, event["memory"], event["requests"]
    ttft = s["time_to_first_token_s"]
    tiles = Table.grid(padding=(0, 3))
    tiles.add_row(f"tok/s {_fmt(s['tokens_per_s'])}", f"decode tok/s {_fmt(s['decode_tokens_per_s'])}",
                  f"first token {_fmt(ttft, 2, ' s')}", f"cache {x.get('capacity') or 'all'}/{x.get('total_experts') or '-'}")  # fmt: skip
    rate = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    tiles.add_row(f"hit rate {rate(x.get('hit_rate'))}", f"prefetch precision {rate(x.get('prefetch_precision'))}",
                  f"MiB/token {_fmt(x.get('mib_read_per_token'), 2)}", f"disk {_fmt(x.get('disk_mb_per_s'))} MB/s")  # fmt: skip
    parts = [head, keys, tiles]
    h = event.get("heat")
    if h is None:
        parts.append(Text("every expert is resident: nothing is paged", style="grey50"))
    else:
        rows = heat_rows(height)
        n_layers, cols = len(h["rows"]), max(8, width - 12)
        view.first_layer = max(0, min(view.first_layer, n_layers - 1))
        view.first_expert = max(0, min(view.first_expert, max(0, h["experts"] - cols)))
        shown = range(view.first_layer, min(n_layers, view.first_layer + rows))
        e0, e1 = view.first_expert, min(h["experts"], view.first_expert + cols)
        title = f"heat map: layers {h['layers'][shown.start]}-{h['layers'][shown.stop - 1]} of {n_layers}"
        title += f", experts {e0}-{e1 - 1} of {h['experts']}"
        parts.append(Text(title, style="bold"))
        for i in shown:
            line = Text(f"{h['layers'][i]:>4} ", style="grey50")
            cells = h["rows"][i][e0:e1]
            start = 0
            for j in range(1, len(cells) + 1):  # one styled run per state, not one per expert
                if j == len(cells) or cells[j] != cells[start]:
                    line.append("█" * (j - start), style=STYLES.get(cells[start], "white"))
                    start = j
            hr = h["layer_hit_rate"][i]
            line.append(f" {rate(hr)}", style="grey50")
            parts.append(line)
        legend = Text()
        for k, name in NAMES.items():
            legend.append("█ ", style=STYLES[k]).append(f"{name}  ")
        parts.append(legend)
    cats = m["categories"]
    mem = Text("memory: ")
    mem.append("  ".join(f"{k.replace('_', ' ')} {_bytes(v)}" for k, v in cats.items()))
    mem.append(
        f"  | RSS {_bytes(m['rss_bytes'])}, limit {_bytes(m['limit_bytes']) if m['limit_bytes'] else 'none'}"
    )
    parts.append(mem)
    parts.append(
        Text(
            f"requests: {r['running']} running, {r['waiting']} waiting, mean batch {_fmt(r['mean_batch'], 2)}"
        )
    )
    table = Table("state", "prompt", "generated", "max", "age", "first token", box=None, padding=(0, 2))
    for q in r["sequences"][: max(1, height - FIXED_LINES - len(shown) + 3) if h else 8]:
        table.add_row(q["state"], str(q["prompt_tokens"]), str(q["generated"]), str(q["max_tokens"]),
                      _fmt(q["age_s"], 1, " s"), _fmt(q["time_to_first_token_s"], 2, " s"))  # fmt: skip
    parts.append(table)
    return Group(*parts)


# ------------------------------------------------------------------------------------------------ keys and loop

_KEYS = {"\x1b[A": "up", "\x1b[B": "down", "\x1b[C": "right", "\x1b[D": "left", "k": "up", "j": "down", "[": "up",
         "]": "down", "h": "left", "l": "right", "p": "pause", " ": "pause", "q": "quit"}  # fmt: skip


def apply_key(key: str, view: View, page_rows: int, page_cols: int) -> bool:
    """Change the view for a key; False when the key means quit."""
    action = _KEYS.get(key)
    if action == "quit":
        return False
    if action == "pause":
        view.paused = not view.paused
    elif action in ("up", "down"):
        view.first_layer = max(0, view.first_layer + (page_rows if action == "down" else -page_rows))
    elif action in ("left", "right"):
        view.first_expert = max(0, view.first_expert + (page_cols if action == "right" else -page_cols))
    return True


def _read_keys(fd: int) -> list[str]:
    data = os.read(fd, 64).decode(errors="ignore")
    keys, i = [], 0
    while i < len(data):
        if data[i] == "\x1b" and data[i + 1 : i + 2] == "[" and i + 2 < len(data):
            keys.append(data[i : i + 3])
            i += 3
        else:
            keys.append(data[i])
            i += 1
    return keys


def main(url: str) -> None:
    import termios
    import tty

    console = Console()
    reader = EventReader(url).start()
    view, shown, fd = View(), None, sys.stdin.fileno()
    interactive = os.isatty(fd)
    saved = termios.tcgetattr(fd) if interactive else None
    try:
        if interactive:
            tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False) as live:
            drawn, dirty = None, True
            while True:
                if not view.paused and (reader.count, reader.error) != drawn:
                    shown, drawn, dirty = reader.latest, (reader.count, reader.error), True
                if dirty:
                    w, h = console.size
                    live.update(render(shown, view, w, h, reader.url, reader.error), refresh=True)
                    dirty = False
                ready = select.select([fd], [], [], 0.1)[0] if interactive else time.sleep(0.1)
                if ready:
                    w, h = console.size
                    for key in _read_keys(fd):
                        if not apply_key(key, view, heat_rows(h), max(8, w - 12)):
                            return
                        dirty = True
    except KeyboardInterrupt:
        pass
    finally:
        reader.stop()
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
