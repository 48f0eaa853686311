"""OpenAI's Responses API (POST /v1/responses), translated to the chat path of server_chat.py."""

from __future__ import annotations


def add_responses_routes(app, authorize) -> None:
    pass
