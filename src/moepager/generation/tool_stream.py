"""Tool calls read from a reply while it is generated: text, or calls whose name and arguments come in pieces.

Owns the incremental reading of a reply in a ToolFormat (generation/tools.py): whether it is a text answer or calls,
each call's name as soon as it is complete and its arguments' JSON text as it grows, and what a reply cut
short still holds. The grammar (generation/tools.py) guarantees the shape; this only follows it, one character at a
time, so a streamed reply and a whole one give the same calls. OpenAI's shapes are the server's.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .tools import ToolFormat

_SPACE = " \t\r\n"


@dataclass
class PartialCall:
    id: str
    name: str | None = None
    arguments: str = ""  # the JSON text of the arguments so far
    complete: bool = False

    def arguments_json(self) -> str:
        """Arguments as compact JSON once complete (OpenAI's form); the text so far when cut short."""
        if not self.complete:
            return self.arguments
        return json.dumps(json.loads(self.arguments or "{}"), ensure_ascii=False)


@dataclass
class Delta:
    """What a piece of the reply added: text, a call's start (its name), or a piece of a call's arguments."""

    kind: str  # "text" | "call" | "arguments"
    text: str = ""  # the text, or the arguments' piece
    index: int = 0  # the call's position among the reply's calls
    call: PartialCall | None = None


@dataclass
class _Object:
    """The reading of one call object {"name": ..., "arguments": ...}, in whatever key order it comes."""

    state: str = "key_or_end"  # key_or_end | key | colon | value | string_value | json_value
    key: str = ""
    raw: str = ""  # the current key or string value, quotes and escapes included
    depth: int = 0  # nesting inside the arguments' value
    in_string: bool = False
    escaped: bool = False
    started: bool = False  # the arguments' value has begun
    held: list[str] = field(default_factory=list)  # arguments read before the name (sent once it is known)


class ToolCallStream:
    """feed(text) -> the Deltas that text makes final. `calls` and `is_calls` describe the reply so far.

    opener_hidden: the format's opener is a special token, which decoding drops; a reply that starts with
    "[" (the JSON list of calls) is then read as calls.
    """

    def __init__(self, fmt: ToolFormat, opener_hidden: bool = False):
        self.fmt, self.opener_hidden = fmt, opener_hidden
        self.is_calls: bool | None = None  # None until the reply's first characters decide
        self.calls: list[PartialCall] = []
        self.text = ""  # a text answer, as fed
        self._pending = ""  # characters not read yet (a prefix of the opener, say)
        self._obj: _Object | None = None
        self.broken = False  # the reply left the format (only possible without a grammar)

    @property
    def complete(self) -> bool:
        """The reply is whole calls, every one complete."""
        return bool(self.is_calls and self.calls and all(c.complete for c in self.calls) and self._obj is None
                    and not self.broken)  # fmt: skip

    def feed(self, text: str) -> list[Delta]:
        if self.is_calls is False:
            self.text += text
            return [Delta("text", text)] if text else []
        self._pending += text
        if self.is_calls is None:
            # as the grammar decides: a reply is calls when it starts with the opener (a JSON list may follow
            # a hidden opener after spaces), and text otherwise
            head = self._pending.lstrip(_SPACE) if self.opener_hidden else self._pending
            opener = "[" if self.opener_hidden else self.fmt.open.strip()
            if not head or (opener.startswith(head) and head != opener):
                return []  # still undecided
            self.is_calls = head.startswith(opener)
            if not self.is_calls:
                self.text, self._pending = self._pending, ""
                return [Delta("text", self.text)]
        return self._read()

    def finish(self) -> list[Delta]:
        """The reply has ended: a reply still undecided is text, unless it is the start of a call (cut short)."""
        if self.is_calls is not None:
            return []
        head = self._pending.lstrip(_SPACE) if self.opener_hidden else self._pending
        opener = "[" if self.opener_hidden else self.fmt.open.strip()
        self.is_calls = bool(head) and opener.startswith(head)
        if self.is_calls:
            return []
        self.text, self._pending = self._pending, ""
        return [Delta("text", self.text)] if self.text else []

    def _read(self) -> list[Delta]:
        out: list[Delta] = []
        while self._pending and not self.broken:
            if self._obj is None:
                if not self._between_calls():
                    break
                continue
            ch, self._pending = self._pending[0], self._pending[1:]
            self._object_char(ch, out)
        return out

    def _between_calls(self) -> bool:
        """Skip what separates calls (space, markup, list punctuation); False when more text is needed."""
        rest = self._pending = self._pending.lstrip(_SPACE)
        for mark in (self.fmt.open.strip(), self.fmt.close.strip()):
            if mark and rest.startswith(mark):
                self._pending = rest[len(mark) :]
                return True
            if mark and mark.startswith(rest):
                return False  # part of a mark
        if self.fmt.array and rest[0] in "[,]":
            self._pending = rest[1:]
            return True
        if rest[0] != "{":
            self.broken = True
            return False
        self._pending = rest[1:]
        self._obj = _Object()
        self.calls.append(PartialCall(f"call_{uuid.uuid4().hex[:24]}"))
        return True

    def _object_char(self, ch: str, out: list[Delta]) -> None:
        o, call = self._obj, self.calls[-1]
        if o.state == "key_or_end":
            if ch == '"':
                o.state, o.raw = "key", ch
            elif ch == "}":
                call.complete, self._obj = call.name is not None, None
            elif ch not in _SPACE + ",":
                self.broken = True
        elif o.state in ("key", "string_value"):
            o.raw += ch
            if o.escaped:
                o.escaped = False
            elif ch == "\\":
                o.escaped = True
            elif ch == '"':
                if o.state == "key":
                    o.key, o.state = json.loads(o.raw), "colon"
                else:
                    self._name_read(json.loads(o.raw), out)
                    o.state = "key_or_end"
        elif o.state == "colon":
            if ch == ":":
                o.state = "value"
            elif ch not in _SPACE:
                self.broken = True
        elif o.state == "value":
            if ch in _SPACE:
                return
            if o.key == "name":
                o.state, o.raw = "string_value", ch
                if ch != '"':
                    self.broken = True
            else:  # the arguments, or a key no format has (read and dropped the same way)
                o.state, o.depth, o.in_string, o.escaped = "json_value", 0, False, False
                self._value_char(ch, out)
        elif o.state == "json_value":
            self._value_char(ch, out)

    def _value_char(self, ch: str, out: list[Delta]) -> None:
        """One character of a JSON value; the value ends at the bracket that closes it, or, for a bare
        number or word, at the comma or brace after it (which then belongs to the object)."""
        o = self._obj
        if not o.in_string and o.depth == 0 and o.started and ch in _SPACE + ",}":
            o.state, o.started = "key_or_end", False
            self._object_char(ch, out)
            return
        o.started = True
        if o.in_string:
            if o.escaped:
                o.escaped = False
            elif ch == "\\":
                o.escaped = True
            elif ch == '"':
                o.in_string = False
        elif ch == '"':
            o.in_string = True
        elif ch in "{[":
            o.depth += 1
        elif ch in "}]":
            o.depth -= 1
        self._arguments_piece(ch, out)
        if o.depth == 0 and not o.in_string and ch in '}]"':
            o.state, o.started = "key_or_end", False

    def _arguments_piece(self, piece: str, out: list[Delta]) -> None:
        o, call = self._obj, self.calls[-1]
        if o.key != "arguments":
            return
        call.arguments += piece
        if call.name is None:
            o.held.append(piece)
        elif out and out[-1].kind == "arguments" and out[-1].index == len(self.calls) - 1:
            out[-1].text += piece
        else:
            out.append(Delta("arguments", piece, len(self.calls) - 1, call))

    def _name_read(self, name: str, out: list[Delta]) -> None:
        o, call = self._obj, self.calls[-1]
        call.name = name
        out.append(Delta("call", "", len(self.calls) - 1, call))
        if o.held:
            out.append(Delta("arguments", "".join(o.held), len(self.calls) - 1, call))
            o.held = []
