"""`moepager chat`: a conversation with a model, on a terminal or from piped stdin.

Owns the conversation: the message history, the chat template applied to it at each turn, the KV cache kept
between turns (a turn computes only the tokens after the longest prefix it shares with the cache), streaming
each reply, and the slash commands. Loading the model and parsing flags are the CLI's.

On a terminal each line typed is a user turn. From a pipe, each non-empty line of stdin is a user turn too,
answered in order; stdout then holds only the replies, one after another, each ending with a newline.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..errors import MoepagerError
from ..generation.generate import check_sampling
from ..generation.tokenizer import StreamingDetokenizer, check_utf8
from ..runtime.summary import DecodeReads, summary_line

COMMANDS = "/reset starts over, /stats shows speed and cache use so far, /exit leaves (or Ctrl-D)"


class Conversation:
    """Messages so far and the KV cache that holds them; reply() streams the model's answer to a user turn."""

    def __init__(self, engine, max_tokens: int, sampling: dict, context: int, system: str | None = None):
        if engine.tokenizer is None:
            raise MoepagerError(
                f"{engine.path} has no tokenizer.json; chat needs text (use run --prompt-ids)"
            )
        if not engine.tokenizer.chat_template:
            raise MoepagerError(
                f"{engine.path}: the tokenizer has no chat template; use moepager run --raw --prompt TEXT"
            )
        self.engine, self.max_tokens, self.sampling, self.context = engine, max_tokens, sampling, context
        self.system = system
        self.reads = DecodeReads(engine)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._drop_cache()

    def _drop_cache(self) -> None:
        if hasattr(getattr(self, "cache", None), "close"):  # a spilling cache holds a scratch file
            self.cache.close()
        self.cache, self.cached_ids = None, []  # cached_ids: the ids whose K/V the cache holds

    def reply(self, text: str):
        """Yield the answer's text piece by piece; the turn and the answer join the history when it ends (an
        interrupted answer joins as far as it got)."""
        messages = self.messages + [{"role": "user", "content": check_utf8(text, "the message")}]
        ids = self.engine.tokenizer.encode_chat(messages)
        # the sampling values were checked before the model loaded; each turn only has to fit the context
        check_sampling(self.max_tokens, prompt_tokens=len(ids), context=self.context)
        reuse = 0
        if self.cache is None:
            self.cache = self.engine.new_cache()
        else:  # at least one new token must go through the model, for the next-token logits
            while reuse < min(len(self.cached_ids), len(ids) - 1) and self.cached_ids[reuse] == ids[reuse]:
                reuse += 1
            self.cache.truncate(reuse)
        detok, pieces, out = StreamingDetokenizer(self.engine.tokenizer), [], []
        finished = False
        try:
            stream = self.engine.stream(ids[reuse:], self.max_tokens, cache=self.cache, **self.sampling)
            for tid in self.reads.count(stream):
                out.append(tid)
                pieces.append(detok.add(tid))
                yield pieces[-1]
            finished = True
        finally:
            self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
            if finished:  # the last id yielded never went through the model
                self.cached_ids = (ids + out)[: self.cache.seq_len]
            else:  # stopped inside a forward: some layers may hold a position others lack
                self._drop_cache()

    def stats_line(self) -> str:
        turns = sum(m["role"] == "user" for m in self.messages)
        return f"{turns} turns, {len(self.cached_ids)} tokens in the cache; " + summary_line(
            self.engine.stats(), self.reads
        )


def _lines(stdin: TextIO):
    """Each line of a piped stdin, decoded strictly: a line that is not UTF-8 comes as a MoepagerError naming
    it (never passed on as U+FFFD), and the lines after it still come."""
    source = getattr(stdin, "buffer", None)
    for n, raw in enumerate(source if source is not None else stdin, 1):
        if isinstance(raw, str):
            yield raw
            continue
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield MoepagerError(
                f"stdin line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start}); skipped it "
                "(convert the input to UTF-8, e.g. iconv -t UTF-8)"
            )


def _command(conv: Conversation, line: str, err: TextIO) -> bool:
    """Run a slash command; False when it asks to leave."""
    cmd = line.split()[0].lower()
    if cmd in ("/exit", "/quit", "/bye"):
        return False
    if cmd == "/reset":
        conv.reset()
        print("(conversation reset)", file=err, flush=True)
    elif cmd == "/stats":
        print(conv.stats_line(), file=err, flush=True)
    else:
        print(f"unknown command {cmd}: {COMMANDS}", file=err, flush=True)
    return True


def main(conv: Conversation, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> None:  # fmt: skip
    """Talk until /exit or the end of input. A terminal gets a prompt and line editing; Ctrl-C stops a reply."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"moepager chat with {conv.engine.path.name}: {COMMANDS}", file=stderr, flush=True)
    lines = None if interactive else _lines(stdin)
    while True:
        try:
            line = input(">>> ") if interactive else next(lines, None)
        except (EOFError, KeyboardInterrupt):
            line = None
        except UnicodeDecodeError as e:  # a terminal that sent bytes that are not UTF-8
            print(f"moepager: error: the line is not valid UTF-8 ({e.reason}); type it again", file=stderr)
            continue
        if line is None:
            if interactive:
                print(file=stdout)
            return
        if isinstance(line, MoepagerError):  # one refused line of a pipe: the others are still answered
            print(f"moepager: error: {line}", file=stderr, flush=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(conv, line, stderr):
                return
            continue
        try:
            for piece in conv.reply(line):
                print(piece, end="", file=stdout, flush=True)
        except KeyboardInterrupt:
            if not interactive:
                raise
        except MoepagerError as e:
            if not interactive:
                raise
            print(f"\nmoepager: error: {e} (/reset starts the conversation over)", file=stderr, flush=True)
        print(file=stdout, flush=True)
