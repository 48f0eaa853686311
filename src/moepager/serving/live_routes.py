"""The live view's routes: the page at `/` (a chat playground and the expert cache panel), its assets, and
`GET /events`, the server-sent event stream of serving/live.py's snapshots (docs/live.md).

Owns serving the packaged assets (moepager/web: plain HTML, JS and CSS, nothing loaded from the network) and
the event stream's HTTP side. The events themselves are serving/live.py's. Like /metrics, /events and the page are
open without the API key (they carry counters, no text); the page's chat sends the key the user types.
"""

from __future__ import annotations

import json
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from .fields import APIError
from .live import LiveFeed

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}  # fmt: skip


def _assets() -> dict[str, bytes]:
    """Every file of the packaged page, by name, read once."""
    folder = resources.files("moepager.serving.web")
    return {f.name: f.read_bytes() for f in folder.iterdir() if any(f.name.endswith(x) for x in _TYPES)}


def add_live_routes(app: FastAPI, feed: LiveFeed) -> None:
    assets = _assets()

    def asset(name: str) -> Response:
        if name not in assets:
            raise APIError(404, f"GET /static/{name}: no such file", "not_found_error")
        kind = _TYPES["." + name.rsplit(".", 1)[-1]]
        return Response(assets[name], media_type=kind, headers={"Cache-Control": "no-cache"})

    @app.get("/")
    async def page():
        return asset("index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        return asset(name)

    @app.get("/events")
    async def events():
        async def stream():
            async for event in feed.subscribe():
                yield {"data": json.dumps(event, separators=(",", ":"))}

        return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-cache"})
