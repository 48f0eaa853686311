"""The README's pictures of the live view: docs/img/live-page.png (the page at / in Debian's headless Chromium,
while a chat reply streams) and docs/img/top.png (`moepager top`'s panel for an event of the same server,
drawn by rich and photographed by the same browser). Serves the default model at 25% expert memory.

    python docs/screenshots.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
from live_view import CHROMIUM, CHROMIUM_ARGS, start_server  # noqa: E402


def top_svg(event: dict, url: str, path: Path) -> None:
    from rich.console import Console

    from moepager.serving.top import View, render

    width, height = 110, 46
    console = Console(
        record=True, width=width, height=height, file=open("/dev/null", "w"), color_system="truecolor"
    )
    console.print(render(event, View(), width, height, url))
    console.save_svg(str(path), title="moepager top")


def main() -> None:
    out = HERE / "img"
    out.mkdir(exist_ok=True)
    proc, base = start_server(None, "25%")
    profile = Path(tempfile.mkdtemp(prefix="moepager-chromium-"))
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": 1320, "height": 980},
            )  # fmt: skip
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("window.moepagerLive.events > 2", timeout=60_000)
            page.fill("#prompt", "Tell me about the history of the printing press.")
            page.press("#prompt", "Enter")
            # a moment into the reply: the map shows this token's hits and misses
            page.wait_for_function(
                "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant')"
                ".textContent.length > 160",
                timeout=300_000,
            )
            page.screenshot(path=str(out / "live-page.png"))
            with urllib.request.urlopen(base + "/events", timeout=30) as r:
                for line in r:
                    if line.startswith(b"data:") and (ev := json.loads(line[5:]))["requests"]["running"]:
                        break
            svg = out / "top.svg"
            top_svg(ev, base, svg)
            shot = browser.new_page()
            shot.goto(svg.as_uri())
            time.sleep(0.5)
            shot.locator("svg").screenshot(path=str(out / "top.png"))
            svg.unlink()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {out / 'live-page.png'} and {out / 'top.png'}")


if __name__ == "__main__":
    main()
