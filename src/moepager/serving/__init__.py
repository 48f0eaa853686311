"""Serving: the OpenAI-compatible HTTP server and what watches it.

Owns the server and its worker (server.py: one worker owns the engine, handlers only enqueue), requests as they
arrive (fields.py: body schemas, which fields are served, errors in OpenAI's shape), the chat path shared by
/v1/chat/completions, /v1/responses (responses.py) and /v1/messages (messages.py) in chat.py, one choice's
text from its tokens (choices.py), Prometheus metrics (metrics.py), the live view's events (live.py) and page
(live_routes.py, web/), and `moepager top`, the same panel in a terminal (top.py).

Imports the engine, generation and everything below; nothing imports it but the command line.
"""
