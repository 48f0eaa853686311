"""Tool calls in a model's own chat-template format: the grammar that constrains them and their parsing.

Owns recognising a template's tool-call format, the Lark grammar (llguidance) for "auto", "required" and a
named function, parsing the generated text back into OpenAI `tool_calls`, and turning OpenAI tool messages
into what chat templates expect. Templates without a tool-call format are refused (no invented format
the model was never trained on).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .constrain import JSON_OPTIONS


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # the text that starts a call
    close: str  # the text that ends a call ("" when the calls are one JSON array)
    array: bool  # the calls are one JSON list after `open` (Mistral), else one tagged object each (Hermes)


HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", array=False)  # Qwen, Hermes, many others
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", array=True)


def tool_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches its model, if any."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    return None


def call_schema(tools: list[dict], only: str | None = None) -> dict:
    """JSON schema of one call {"name": ..., "arguments": {...}} to any of `tools` (or just `only`)."""
    options = [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": t["function"]["name"]},
                        "arguments": t["function"].get("parameters") or {"type": "object"}}}
        for t in tools if only is None or t["function"]["name"] == only
    ]  # fmt: skip
    return {"anyOf": options, "x-guidance": JSON_OPTIONS}


def tool_grammar(fmt: ToolFormat, tools: list[dict], choice: str, only: str | None, parallel: bool,
                 opener_token: int | None) -> str:  # fmt: skip
    """Lark for llguidance. choice "auto": free text (not starting like a call) or calls; else calls only.

    opener_token: the token id of `fmt.open` when the tokenizer has it as one special token (then the grammar
    must name the token: special tokens are not text).
    """
    schema = call_schema(tools, only)
    opener = f"<[{opener_token}]>" if opener_token is not None else json.dumps(fmt.open)
    if fmt.array:
        array = {"type": "array", "items": schema, "minItems": 1, "x-guidance": JSON_OPTIONS}
        if not parallel:
            array["maxItems"] = 1
        calls = f"calls: {opener} call_list\ncall_list: %json {json.dumps(array)}\n"
    else:
        many = ' ("\\n" call)*' if parallel else ""
        calls = (f"calls: call{many}\ncall: {opener} call_json {json.dumps(fmt.close)}\n"
                 f"call_json: %json {json.dumps(schema)}\n")  # fmt: skip
    if choice == "auto":
        first = fmt.open[0] if opener_token is None else None
        text = "TEXT: /(.|\\n)+/" if first is None else f"TEXT: /[^{_regex_escape(first)}](.|\\n)*/"
        return f"start: calls | TEXT\n{calls}{text}\n"
    return f"start: calls\n{calls}"


def parse_tool_calls(text: str, fmt: ToolFormat) -> list[dict] | None:
    """OpenAI tool_calls from generated text, or None when the text is not (only) tool calls."""
    body = text.strip()
    if fmt.array:
        body = body[len(fmt.open) :] if body.startswith(fmt.open) else body  # a special opener is not decoded
        try:
            calls = json.loads(body)
        except json.JSONDecodeError:
            return None
    else:
        calls = []
        while body.startswith(fmt.open.strip()):
            end = body.find(fmt.close.strip())
            if end < 0:
                return None
            try:
                calls.append(json.loads(body[len(fmt.open.strip()) : end]))
            except json.JSONDecodeError:
                return None
            body = body[end + len(fmt.close.strip()) :].strip()
        if body or not calls:
            return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
            for c in calls]  # fmt: skip


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates read them: a call's arguments as a dict, not a JSON string."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {"id": c.get("id"), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]  # fmt: skip
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _loads(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _regex_escape(ch: str) -> str:
    return "\\" + ch if ch in "\\^]-[/" else ch
