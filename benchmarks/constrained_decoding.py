"""Grammar-constrained decoding libraries side by side: compile time and per-token mask time on a real vocabulary.

Each library gets the same tokenizer (the default model's 49152-token byte-level BPE, or TOKENIZER_JSON),
the same JSON schema and the same forced token sequence (a valid instance, tokenized): at each position it
computes the allowed-token mask, then advances by the next token. Rounds alternate the library order.

    pip install llguidance==1.9.1 outlines-core==0.2.14
    pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2   # its triton dependency is GPU-only
    python benchmarks/constrained_decoding.py [TOKENIZER_JSON] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },  # fmt: skip
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
            "address": {"city": "London", "zip": "W1"}}  # fmt: skip


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-ins for the 256 bytes, inverted."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def llguidance_run(tok_json: str, eos: int, schema: str, ids: list[int]):
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(tok_json, eos_token=eos)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema))
    mask = lt.allocate_token_bitmask(1, tokenizer.vocab_size)
    lt.fill_next_token_bitmask(matcher, mask)
    t_compile = time.perf_counter() - t0
    times = []
    for t in ids:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(matcher, mask)
        times.append(time.perf_counter() - t0)
        assert (mask[0, t // 32] >> (t % 32)) & 1, "llguidance refused a valid token"
        assert matcher.consume_token(t)
    return t_tok, t_compile, times


def xgrammar_run(tok_json: str, eos: int, schema: str, ids: list[int]):
    import xgrammar as xgr
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    vocab = Tokenizer.from_str(tok_json).get_vocab(with_added_tokens=True)
    encoded = [""] * len(vocab)
    for s, i in vocab.items():
        encoded[i] = s
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(schema))
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(mask)
    t_compile = time.perf_counter() - t0
    times = []
    for t in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t0)
        assert (mask[0, t // 32] >> (t % 32)) & 1, "xgrammar refused a valid token"
        assert matcher.accept_token(t)
    return t_tok, t_compile, times


def outlines_run(tok_json: str, eos: int, schema: str, ids: list[int]):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    dec = _byte_decoder()
    tokens: dict[bytes, list[int]] = {}
    for s, i in Tokenizer.from_str(tok_json).get_vocab(with_added_tokens=False).items():
        if i != eos and all(c in dec for c in s):
            tokens.setdefault(bytes(dec[c] for c in s), []).append(i)
    vocabulary = Vocabulary(eos, tokens)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(schema), vocabulary))
    n = (max(max(v) for v in tokens.values()) + 32) // 32 * 32
    mask = torch.zeros(1, n // 32, dtype=torch.int32)
    guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
    t_compile = time.perf_counter() - t0
    times = []
    for t in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - t0)
        assert (mask[0, t // 32] >> (t % 32)) & 1, "outlines-core refused a valid token"
        guide.advance(t)
    return t_tok, t_compile, times


def moepager_run(tok_json: str, eos: int, schema: str, ids: list[int]):
    """What the server pays per token: moepager.generation.constrain (llguidance) computing the mask and applying it to
    a [1, V] logits row, then advancing."""
    from moepager.generation.constrain import Grammars, json_schema_grammar

    t0 = time.perf_counter()
    grammars = Grammars(tok_json, 49152, [eos])
    grammars._tokenizer()
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    constraint = grammars.matcher(json_schema_grammar(json.loads(schema)))
    t_compile = time.perf_counter() - t0
    logits = torch.randn(1, 49152)
    times = []
    for t in ids:
        row = logits.clone()
        t0 = time.perf_counter()
        constraint.mask_(row)
        times.append(time.perf_counter() - t0)
        assert row[0, t] > float("-inf"), "moepager refused a valid token"
        constraint.advance(t)
    return t_tok, t_compile, times


RUNNERS = {"llguidance": llguidance_run, "xgrammar": xgrammar_run, "outlines-core": outlines_run,
           "moepager.generation.constrain (llguidance, mask applied)": moepager_run}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer", nargs="?", help="a tokenizer.json (default: the default model's)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.tokenizer:
        path = Path(args.tokenizer)
    else:
        from moepager.moefy.default_model import default_model_path

        path = default_model_path() / "tokenizer.json"
    from tokenizers import Tokenizer

    tok_json = path.read_text()
    tok = Tokenizer.from_str(tok_json)
    eos = tok.token_to_id("<|im_end|>") or 0
    text = json.dumps(INSTANCE)
    ids = tok.encode(text, add_special_tokens=False).ids
    print(f"tokenizer {path} vocabulary {tok.get_vocab_size()}; {len(ids)} forced tokens of {text}")
    print("| grammar | library | tokenizer setup s | compile s | mask/token median ms | p90 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for grammar, schema in (("json_schema", SCHEMA), ("json_object", {"type": "object"})):
        results: dict[str, list] = {name: [] for name in RUNNERS}
        for r in range(args.rounds):
            order = list(RUNNERS) if r % 2 == 0 else list(reversed(RUNNERS))
            for name in order:
                try:
                    results[name].append(RUNNERS[name](tok_json, eos, json.dumps(schema), ids))
                except Exception as e:  # a library that is not installed or fails is reported, not fatal
                    results[name].append(e)
        for name, runs in results.items():
            ok = [x for x in runs if not isinstance(x, Exception)]
            if not ok:
                print(f"| {grammar} | {name} | failed: {type(runs[0]).__name__}: {runs[0]} | | | | |")
                continue
            per = sorted(t for _, _, times in ok for t in times)
            med = statistics.median
            print(f"| {grammar} | {name} | {med([a for a, _, _ in ok]):.2f} | {med([b for _, b, _ in ok]):.3f} | "
                  f"{med(per) * 1e3:.3f} | {per[int(0.9 * len(per))] * 1e3:.3f} | {per[-1] * 1e3:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
