"""Text <-> token ids from a checkpoint's tokenizer files, chat templates, and a streaming detokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import MoepagerError


class Tokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template_file = folder / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.exists() else cfg.get("chat_template")
        self.eos_ids = [i for i in [self.tok.token_to_id(self.eos_token or "")] if i is not None]

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer | None:
        return cls(folder) if (folder / "tokenizer.json").exists() else None

    @classmethod
    def from_parts(cls, tok, bos_token: str | None, eos_token: str | None, chat_template: str | None,
                   eos_ids: list[int]) -> Tokenizer:  # fmt: skip
        """A tokenizer built in memory (generation/gguf_tokenizer.py: from a GGUF's metadata) rather than read from files."""
        self = cls.__new__(cls)
        self.tok, self.bos_token, self.eos_token = tok, bos_token, eos_token
        self.chat_template, self.eos_ids = chat_template, eos_ids
        return self

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        if not self.chat_template:
            raise MoepagerError("this model's tokenizer has no chat template; use a plain prompt")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        env.filters["tojson"] = _tojson
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            tools=tools,
        )

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        # the template already writes special tokens such as BOS
        return self.encode(self.apply_chat_template(messages, tools=tools), add_special_tokens=False)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """As transformers renders templates: tool schemas as JSON without jinja's HTML escaping of < > & '."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class StreamingDetokenizer:
    """Feed ids one at a time; get back only the new, complete text (no split UTF-8 characters).

    Decodes a short window, not the whole sequence (text-generation-inference's decode_token): the window's
    first `read` ids were emitted already and stay as context, because a token's text depends on its
    neighbours (a word-level tokenizer puts spaces between words, SentencePiece drops a leading space).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.read = tokenizer, [], 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[: self.read])
        text = self.tokenizer.decode(self.ids)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # nothing new (a skipped special token) or a character still incomplete
        self.ids, self.read = self.ids[self.read :], len(self.ids) - self.read
        return text[len(done) :]


def check_utf8(text: str, what: str) -> str:
    """text as given, or an error naming `what` when it holds bytes that are not UTF-8 (Python keeps those of
    argv and of some locales' stdin as lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = (
            text[e.start].encode("utf-8", "surrogateescape") if "\udc80" <= text[e.start] <= "\udcff" else b""
        )
        byte = f"byte 0x{bad[0]:02x}" if bad else repr(text[e.start])
        raise MoepagerError(f"{what} is not valid UTF-8 ({byte} at character {e.start}); convert it to UTF-8 "
                            "(e.g. iconv -t UTF-8)") from None  # fmt: skip
    return text
