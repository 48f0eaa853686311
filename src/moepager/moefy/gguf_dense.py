"""A dense llama-architecture GGUF file -> a standard Hugging Face llama checkpoint folder.

Owns: reading the GGUF metadata and tensors (dequantized to fp32 with gguf.quants), undoing llama.cpp's
q/k row permutation, and writing tokenizer.json / tokenizer_config.json (built by generation/gguf_tokenizer.py).
Does not own the MoE GGUF source of the engine (store/gguf*.py); this is only the input side of moefy.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import MoepagerError
from ..generation.gguf_tokenizer import build as build_tokenizer
from ..generation.gguf_tokenizer import read_metadata, tokenizer_config
from ..sources.checkpoint import hub_name
from ..sources.gguf import moepager_name, unpermute_rope

# the tensors of a dense llama, by moepager's names (others, such as a router, are refused)
_DENSE_LLAMA = re.compile(
    r"(embed|norm|lm_head)\.weight|layers\.\d+\.(attn_norm|ffn_norm|attn\.[qkvo]_proj|ffn\.(gate|up|down)_proj)\.weight"
)


def _hf_name(name: str) -> str | None:
    """A dense llama GGUF's tensor name -> its Hugging Face name, through moepager's (sources/gguf.py's table,
    then sources/checkpoint.py's read backwards): one name table per format."""
    ours = moepager_name(name)
    return hub_name(ours, "llama") if ours and _DENSE_LLAMA.fullmatch(ours) else None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_llama(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(HF config.json dict, HF-named fp32 state dict, tokenizer metadata) of a dense llama GGUF."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise MoepagerError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/struct errors on a bad file
        raise MoepagerError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise MoepagerError(
            f"{path}: general.architecture is {arch!r}; only dense 'llama' GGUF files are supported"
        )
    a = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    heads, hidden = a("attention.head_count"), a("embedding_length")
    kv_heads = a("attention.head_count_kv", heads)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    state = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                raise MoepagerError(f"{path}: rope_freqs (llama3 rope scaling) is not supported")
            raise MoepagerError(f"{path}: unknown tensor {t.name!r} for a llama model")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        w = torch.from_numpy(np.ascontiguousarray(w))
        if ".attn_q." in t.name:
            w = unpermute_rope(w, heads).contiguous()
        elif ".attn_k." in t.name:
            w = unpermute_rope(w, kv_heads).contiguous()
        state[name] = w
    tied = "lm_head.weight" not in state
    eps = float(f"{a('attention.layer_norm_rms_epsilon', 1e-5):.7g}")  # stored as fp32: 1e-5 -> 9.9999997e-06
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(
            a("vocab_size", len(tokens) if tokens else state["model.embed_tokens.weight"].shape[0])
        ),
        "hidden_size": int(hidden),
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(a("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(a("context_length", 4096)),
        "rms_norm_eps": eps,
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    tok = read_metadata({name: f.contents() for name, f in reader.fields.items()})
    return config, state, tok


def write_hf_folder(config: dict, state: dict[str, torch.Tensor], tok: dict | None, out: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files into `out` (which must exist)."""
    from safetensors.torch import save_file

    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"})
    if tok is not None and tok["tokens"]:
        build_tokenizer(tok).save(str(out / "tokenizer.json"))
        cfg = {**tokenizer_config(tok), "model_max_length": config["max_position_embeddings"]}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def convert_gguf(path: str | Path, out: str | Path) -> Path:
    """Convert a dense llama GGUF into an HF checkpoint folder at `out`, written under a temp name then renamed."""
    out = Path(out)
    config, state, tok = read_gguf_llama(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    write_hf_folder(config, state, tok, tmp)
    os.replace(tmp, out)
    return out
