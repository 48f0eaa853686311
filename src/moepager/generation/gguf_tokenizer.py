"""A model's tokenizer and chat template from a GGUF file's own metadata (a GGUF carries no tokenizer.json).

Owns reading `tokenizer.ggml.*` and `tokenizer.chat_template`, and building a `tokenizers.Tokenizer` that
splits text as llama.cpp does for that vocabulary:
- "gpt2": byte-level BPE with the file's merges; the pre-tokenizer split is the one `tokenizer.ggml.pre`
  names (llama.cpp's table; an unknown name is refused rather than guessed).
- "llama": SentencePiece BPE: merges ranked by the vocabulary's scores, byte fallback (`<0xNN>` tokens),
  spaces as "▁" with one prefixed to each run of text (also after a special token, as llama.cpp does).
Control and unknown tokens are special (matched whole, skipped when decoding); user-defined ones are
matched whole.
Rendering the chat template and detokenizing stay in generation/tokenizer.py.
"""

from __future__ import annotations

from ..errors import MoepagerError
from .tokenizer import Tokenizer

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2  # tokenizer.ggml.token_type values

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
# tokenizer.ggml.pre -> the regex splits llama.cpp applies in order (llama-vocab.cpp); "digits" = each digit
PRE_TOKENIZERS = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "olmo", "mpt", "jais"], [_GPT2]),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3", "pixtral"], [_LLAMA3]
    ),
    **dict.fromkeys(["qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan"], [_QWEN2]),
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2"], [_O200K]),
    "deepseek-v3": _DEEPSEEK3,
    **dict.fromkeys(["smollm", "starcoder", "refact"], ["digits", _GPT2]),
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}  # llama.cpp looks a whole word up before merging


def read_metadata(fields: dict) -> dict:
    """The tokenizer fields of a GGUF's metadata values (sources/gguf.py's read_header; None where the file
    has no such field)."""
    g = lambda key, default=None: fields.get(f"tokenizer.ggml.{key}", default)  # noqa: E731
    model = g("model")
    return {
        "model": model,
        "pre": g("pre", "default"),
        "tokens": g("tokens"),
        "scores": g("scores"),
        "token_type": g("token_type"),
        "merges": g("merges"),
        "bos_id": g("bos_token_id"),
        "eos_id": g("eos_token_id"),
        "eot_id": g("eot_token_id"),
        "eom_id": g("eom_token_id"),
        "unk_id": g("unknown_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
        "add_bos": bool(g("add_bos_token", model == "llama")),
        "add_eos": bool(g("add_eos_token", False)),
        "add_space_prefix": bool(g("add_space_prefix", True)),
        "chat_template": fields.get("tokenizer.chat_template"),
    }


def _byte_level(meta: dict):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    splits = PRE_TOKENIZERS.get(meta["pre"])
    if splits is None:
        raise MoepagerError(
            f"GGUF pre-tokenizer {meta['pre']!r} is not known; known: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    if not meta["merges"]:
        raise MoepagerError("the GGUF's byte-level BPE vocabulary has no tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=meta["pre"] in _IGNORE_MERGES)
    )
    steps = [
        pre_tokenizers.Digits(individual_digits=True)
        if s == "digits"
        else pre_tokenizers.Split(Regex(s), behavior="isolated")
        for s in splits
    ]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges a vocabulary implies: every split of a token into two tokens, the best
    scored result first (as SentencePiece merges the adjacent pair whose union scores highest)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        pairs = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((score, left, right) for left, right in pairs)
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in found]


def _sentencepiece(meta: dict):
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    tokens, scores = meta["tokens"], meta["scores"]
    if scores is None:
        raise MoepagerError("the GGUF's SentencePiece vocabulary has no tokenizer.ggml.scores")
    types = meta["token_type"] or []
    unk = (
        meta["unk_id"]
        if meta["unk_id"] is not None
        else next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    )
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = (
        [tuple(m.split(" ", 1)) for m in meta["merges"]] if meta["merges"] else spm_merges(tokens, scores)
    )
    model = BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None,
                fuse_unk=True, byte_fallback=True)  # fmt: skip
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if meta["add_space_prefix"]:  # a normalizer runs on each text run between special tokens
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta["add_space_prefix"]:
        decode.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(decode)
    return tok


def build(meta: dict):
    """A `tokenizers.Tokenizer` from read_metadata's fields."""
    from tokenizers import AddedToken, processors

    if not meta["tokens"]:
        raise MoepagerError("the GGUF has no tokenizer.ggml.tokens: run it with --prompt-ids")
    if meta["model"] == "gpt2":
        tok = _byte_level(meta)
    elif meta["model"] == "llama":
        tok = _sentencepiece(meta)
    else:
        raise MoepagerError(
            f"GGUF tokenizer model {meta['model']!r} is not supported (byte-level BPE 'gpt2' and "
            "SentencePiece 'llama' are); run it with --prompt-ids"
        )
    tokens, types = meta["tokens"], meta["token_type"] or []
    special = (CONTROL, UNKNOWN)  # matched whole, left out of decoded text (as a checkpoint's tokenizer does)
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in special]
    )
    tok.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == USER_DEFINED
        ]
    )
    added = [(meta["bos_id"], meta["add_bos"]), (meta["eos_id"], meta["add_eos"])]
    if any(on and i is not None for i, on in added):
        bos = f"{tokens[meta['bos_id']]} " if meta["add_bos"] and meta["bos_id"] is not None else ""
        eos = f" {tokens[meta['eos_id']]}" if meta["add_eos"] and meta["eos_id"] is not None else ""
        specials = [(tokens[i], i) for i, on in added if on and i is not None]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A{eos}", pair=f"{bos}$A{eos} $B", special_tokens=specials
        )
    elif meta["model"] == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json of the same tokenizer (what a checkpoint folder written from the GGUF holds)."""
    name = lambda i: meta["tokens"][i] if i is not None else None  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(meta["bos_id"]),
        "eos_token": name(meta["eos_id"]),
        "add_bos_token": meta["add_bos"],
    }
    if meta["chat_template"]:
        cfg["chat_template"] = meta["chat_template"]
    return cfg


def gguf_tokenizer(meta: dict) -> Tokenizer | None:
    """The moepager Tokenizer of read_metadata's fields, or None when the file carries no vocabulary."""
    if not meta["tokens"]:
        return None
    name = lambda i: meta["tokens"][i] if i is not None and i < len(meta["tokens"]) else None  # noqa: E731
    # llama.cpp ends generation at any end-of-generation token the file names: end of text, turn, message
    stops = [i for i in (meta["eos_id"], meta["eot_id"], meta["eom_id"]) if i is not None]
    return Tokenizer.from_parts(build(meta), name(meta["bos_id"]), name(meta["eos_id"]), meta["chat_template"],
                                list(dict.fromkeys(stops)))  # fmt: skip
