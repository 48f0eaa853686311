"""Anthropic's Messages API (POST /v1/messages), translated to the chat path of server_chat.py."""

from __future__ import annotations

from .server_fields import APIError

MESSAGES_PATH = "/v1/messages"


def anthropic_error(e: APIError) -> dict:
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    return {"type": "error", "error": {"type": e.type, "message": e.message}}


def add_messages_routes(app, authorize) -> None:
    pass
