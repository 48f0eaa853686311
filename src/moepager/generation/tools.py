"""Tool calls in a chat-template format (the model's own, or the generic one): their grammar and their prompt.

Owns recognising a template's tool-call format, the Lark grammar (llguidance) for "auto", "required" and a
named function, and turning OpenAI tool messages into what chat templates expect (reading calls back from the
generated text is generation/tool_stream.py's). A template without a tool-call format gets the generic one (as llama.cpp
does): the tools and how to call them are written into the system prompt, earlier calls and tool results
into the messages' text, and the grammar holds the reply to a call or a text answer.
"""

from __future__ import annotations

import json
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
# for templates without a format: one JSON list of calls in Hermes' tags, as SmolLM2 (the default model) was
# taught; a list lets the model end its calls with "]", where separate tags invite it to write more of them
GENERIC = ToolFormat("generic", "<tool_call>", "</tool_call>", array=True)


def tool_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches its model, if any."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    return None


def chat_tool_format(chat_template: str | None) -> tuple[ToolFormat, bool]:
    """(the format calls are written in, whether the template itself renders tools and calls)."""
    native = tool_format(chat_template)
    return (native, True) if native is not None else (GENERIC, False)


def generic_tool_prompt(tools: list[dict], required: bool) -> str:
    """The system prompt text that teaches the generic format (the grammar enforces it; this explains it)."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    must = "You must call a tool." if required else "Call a tool when it helps; otherwise answer in text."
    return (f"You can call these tools:\n<tools>\n{listed}\n</tools>\n{must} To call tools, reply with only:\n"
            f'{GENERIC.open}[{{"name": <tool name>, "arguments": <arguments as a JSON object>}}, ... (more calls '
            f"if needed)]{GENERIC.close}\nEach tool's result comes back in a <tool_response> element.")  # fmt: skip


def generic_messages(messages: list[dict], tools: list[dict] | None, required: bool, system_role: bool,
                     tool_role: bool) -> list[dict]:  # fmt: skip
    """OpenAI messages for a template that knows no tools: calls and results as text, the tools' prompt in
    the system message. system_role / tool_role: the template renders those roles (else: user turns)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            listed = [{"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}
                      for c in m.pop("tool_calls")]  # fmt: skip
            calls = GENERIC.open + json.dumps(listed) + GENERIC.close
            m["content"] = f"{m['content']}\n{calls}" if m.get("content") else calls
        if m["role"] == "tool":
            m.pop("tool_call_id", None)
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if not tool_role:
                m["role"] = "user"
        out.append({k: v for k, v in m.items() if v is not None})
    if tools:
        prompt = generic_tool_prompt(tools, required)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        elif system_role:
            out.insert(0, {"role": "system", "content": prompt})
        else:
            first = next((i for i, m in enumerate(out) if m["role"] == "user"), 0)
            out[first] = {**out[first], "content": f"{prompt}\n\n{out[first].get('content') or ''}"}
    return out


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
        close = f" {json.dumps(fmt.close)}" if fmt.close else ""
        calls = f"calls: {opener} call_list{close}\ncall_list: %json {json.dumps(array)}\n"
    else:
        many = ' ("\\n" call)*' if parallel else ""
        calls = (f"calls: call{many}\ncall: {opener} call_json {json.dumps(fmt.close)}\n"
                 f"call_json: %json {json.dumps(schema)}\n")  # fmt: skip
    if choice == "auto":
        first = fmt.open[0] if opener_token is None else None
        text = "TEXT: /(.|\\n)+/" if first is None else f"TEXT: /[^{_regex_escape(first)}](.|\\n)*/"
        return f"start: calls | TEXT\n{calls}{text}\n"
    return f"start: calls\n{calls}"


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


def template_roles(tok) -> tuple[bool, bool]:
    """(renders a system message, renders a tool message): probed once, by rendering a short conversation."""

    def renders(messages: list[dict]) -> bool:
        try:
            return "PROBE-7f3" in tok.apply_chat_template(messages)
        except Exception:  # a template that refuses the role (raise_exception, a failed check)
            return False

    system = renders([{"role": "system", "content": "PROBE-7f3"}, {"role": "user", "content": "q"}])
    tool = renders([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "tool", "content": "PROBE-7f3"}])  # fmt: skip
    return system, tool
