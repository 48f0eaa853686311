"""Grammar-constrained decoding with llguidance: JSON schemas and Lark grammars as masks over the vocabulary.

Owns building llguidance's view of a tokenizer (once per tokenizer: ~0.2 s on a 49k vocabulary), compiling
request grammars, and one sequence's matcher: the allowed-token mask before sampling and advancing by the
sampled token. llguidance was picked by measurement (benchmarks/constrained_decoding.md). Does not own
which grammar a request needs (serving/fields.py, generation/tools.py) nor when masks are applied (generation/sampling.py).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch

from ..errors import MoepagerError

# at most 20 whitespace characters between JSON tokens: enough for the indented JSON models are trained on
# (a model forced to write compact JSON drifts into nonsense), bounded so that no model can pad forever
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}


def json_schema_grammar(schema: dict | bool) -> str:
    """A grammar for JSON text valid under `schema` (True or {} = any JSON value)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps({} if schema is True else schema), defaults=JSON_OPTIONS
    )


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


class Grammars:
    """Compiles grammars against one tokenizer; `matcher(grammar)` gives a fresh Constraint per sequence."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self.tokenizer_json, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, eos_ids
        self._tok = None
        self._lock = threading.Lock()

    def _tokenizer(self):
        import llguidance

        with self._lock:  # built once, on first use, from whichever thread needs it first
            if self._tok is None:
                try:
                    self._tok = llguidance.LLTokenizer(
                        self.tokenizer_json, n_vocab=self.vocab_size, eos_token=self.eos_ids or None
                    )
                except ValueError as e:  # a tokenizer kind llguidance cannot read (a word-level one, say)
                    raise MoepagerError(f"grammars cannot be used with this model's tokenizer: {e}") from None
            return self._tok

    def matcher(self, grammar: str) -> Constraint:
        import llguidance

        m = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise MoepagerError(f"the grammar does not compile: {m.get_error()}")
        return Constraint(m, self.vocab_size)


class Constraint:
    """One sequence's grammar state. Used on the worker thread only."""

    def __init__(self, matcher, vocab_size: int):
        self.m, self.vocab_size = matcher, vocab_size
        self.bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # bit t = token t allowed; reused

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V]: tokens the grammar does not allow next become -inf (in place)."""
        self.m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        banned = np.unpackbits(~self.bits.view(np.uint8), bitorder="little")  # [V rounded up to 32]
        banned = banned[: self.vocab_size].view(bool)  # [V]
        if logits.device.type == "cpu":
            # numpy, single-threaded, in tens of microseconds: a torch op over 49k elements may wake its
            # thread pool, which costs milliseconds on a busy machine
            np.copyto(logits.numpy()[0], -np.inf, where=banned)
            return logits
        return logits.masked_fill_(torch.from_numpy(banned).to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise MoepagerError(f"the grammar refused token {token}: {self.m.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar admits no further token: the output is complete."""
        return self.m.is_stopped()
