"""The page at / in a real headless browser: Debian's Chromium (/usr/bin/chromium, `apt-get install chromium`)
driven by playwright, never a browser playwright downloads. It loads the page, sends a chat message, sees the
reply stream in, and sees the heat map change after the paged request."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from serve_process import serve_process
from tiny_models import build, copy_with_tokenizer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
)


def chromium_page(playwright, profile: Path):
    """A page of Debian's Chromium with a new, empty profile (nothing fetched, nothing synced)."""
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
        viewport={"width": 1280, "height": 900},
    )  # fmt: skip
    return context, context.pages[0] if context.pages else context.new_page()


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no browser: {CHROMIUM} is missing (apt-get install -y chromium)"
)
def test_the_page_chats_and_its_heat_map_moves(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    build("mixtral", tmp_path / "m", num_hidden_layers=6, num_local_experts=16)
    model = copy_with_tokenizer(tmp_path / "m", tmp_path / "served", CHAT_TEMPLATE)
    profile = Path(tempfile.mkdtemp(prefix="moepager-chromium-"))
    failed_requests = []
    try:
        with (
            serve_process(str(model), "--model-name", "tiny", "--expert-memory", "25%") as base,
            sync_playwright() as p,
        ):
            context, page = chromium_page(p, profile)
            page.on("requestfailed", lambda r: failed_requests.append(r.url))
            page.goto(base + "/")
            expect(page.locator("#link")).to_have_text("live", timeout=30_000)
            expect(page.locator("#model")).to_have_value("tiny", timeout=30_000)
            heat = page.locator("#heat")
            page.wait_for_function(
                "document.getElementById('heat').dataset.seq !== undefined", timeout=30_000
            )
            before = page.evaluate("document.getElementById('heat').toDataURL()")
            counts_before = heat.get_attribute("data-counts")
            assert "m:" not in counts_before  # idle: nothing missed since the last event
            # every state the map draws from now on
            page.evaluate("""window.drawn = new Set(); new MutationObserver(() => {
                for (const c of document.getElementById('heat').dataset.counts.split(' ')) drawn.add(c[0]);
            }).observe(document.getElementById('heat'), {attributes: true, attributeFilter: ['data-counts']});""")
            page.click("#settings summary")  # the settings, folded away until asked for
            page.fill("#max-tokens", "48")
            page.fill("#seed", "1")
            page.fill("#prompt", "w5 w6 w7")
            page.press("#prompt", "Enter")
            reply = page.locator(".msg.assistant").last
            # the reply streams: text shows while it is still being generated, then it ends with its usage
            page.wait_for_function(
                "(() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
                " return m && m.classList.contains('streaming') && m.textContent.length > 0; })()",
                timeout=60_000,
            )
            expect(reply).to_have_attribute("data-done", "1", timeout=120_000)
            assert "48 tokens" in reply.inner_text() and page.locator("#chat-error").inner_text() == ""
            # the heat map drew misses and hits while the request ran, and differs from before it
            page.wait_for_function("window.drawn.has('m') && window.drawn.has('h')", timeout=30_000)
            assert page.evaluate("document.getElementById('heat').toDataURL()") != before
            tiles = page.locator("#tiles").inner_text()
            assert "hit rate" in tiles and "MiB read / token" in tiles
            assert "expert cache" in page.locator("#memory").inner_text()
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert not [u for u in failed_requests if "/events" not in u and "/v1/" not in u], failed_requests
