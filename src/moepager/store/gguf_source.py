"""GgufSource: the ModelSource of a MoE GGUF file (llama.cpp's layout), read in place.

Owns the translation from llama.cpp's tensor names and `{arch}.*` metadata to moepager's names and a
config.json-like dict (so ModelConfig's one translation table still decides the architecture), and reading
one routed expert as three byte ranges of the stacked `ffn_{gate,up,down}_exps` tensors (expert dimension
outermost, so each expert's matrix is one contiguous range), dequantized exactly as gguf.quants does.
F32/F16/BF16 tensors keep their dtype; block-quantized ones (Q8_0, Q4_0, Q4_K, ...) come out as fp32.
It does not tokenize (GGUF vocabularies are moefy's concern) and it does not run DeepSeek's MLA layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import config_from_hf
from ..errors import CorruptFile, MoepagerError, UnsupportedArchitecture
from ..moe import ExpertWeights
from .safetensors import read_bytes

# llama.cpp name (after "blk.N.") -> moepager name (after "layers.N."); the one table for GGUF names
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight", "attn_q.bias": "attn.q_proj.bias",
    "attn_k.weight": "attn.k_proj.weight", "attn_k.bias": "attn.k_proj.bias",
    "attn_v.weight": "attn.v_proj.weight", "attn_v.bias": "attn.v_proj.bias",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    "ffn_gate_inp.weight": "ffn.router.weight",
    "ffn_gate_inp_shexp.weight": "ffn.shared_gate.weight",
    "ffn_gate_shexp.weight": "ffn.shared.gate_proj.weight",
    "ffn_up_shexp.weight": "ffn.shared.up_proj.weight",
    "ffn_down_shexp.weight": "ffn.shared.down_proj.weight",
    "ffn_gate.weight": "ffn.gate_proj.weight",  # dense layers (e.g. Qwen3-MoE mlp_only_layers)
    "ffn_up.weight": "ffn.up_proj.weight",
    "ffn_down.weight": "ffn.down_proj.weight",
}  # fmt: skip
GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
EXPERT_PARTS = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)$")
# general.architecture -> (HF model_type, rows of q/k permuted by llama.cpp for its interleaved rope)
ARCHITECTURES = {
    "llama": ("mixtral", True),
    "qwen2moe": ("qwen2_moe", False),
    "qwen3moe": ("qwen3_moe", False),
    "olmoe": ("olmoe", False),
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time q/k row permutation (its interleaved pairs -> Hugging Face's halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(raw: np.ndarray | bytes | bytearray, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of a GGUF tensor (or whole rows of one) -> a tensor of `shape` (numpy order, outer first)."""
    import gguf

    data = (
        np.frombuffer(raw, dtype=np.uint8)
        if not isinstance(raw, np.ndarray)
        else raw.reshape(-1).view(np.uint8)
    )
    name = gguf.GGMLQuantizationType(qtype).name
    if name in _PLAIN:  # stored as is: view, keep the dtype
        owned = raw if isinstance(raw, bytearray) else bytearray(data)  # a bytearray read is ours to keep
        return torch.frombuffer(owned, dtype=_PLAIN[name]).reshape(shape)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = data.reshape(-1, shape[-1] // block * block_bytes)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, qtype), np.float32)).reshape(
        shape
    )


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class GgufSource:
    """A MoE GGUF file. Experts are read by byte range from the file; dense tensors are read once."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise MoepagerError(f"no such GGUF file: {self.path}")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the gguf package raises ValueError or struct errors on a damaged file
            raise CorruptFile(f"{self.path}: not a readable GGUF file ({e})") from None
        arch = _field(self.reader, "general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"{self.path}: GGUF architecture {arch!r} is not supported; supported: "
                f"{', '.join(ARCHITECTURES)} (DeepSeek's MLA layout is not read from GGUF yet; run the "
                "Hugging Face checkpoint instead)"
            )
        self.arch = arch
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.raw_config = self._hf_config()
        self.config = config_from_hf(self.raw_config)
        self.experts = self._index_experts()

    def _meta(self, key: str, default=None):
        return _field(self.reader, f"{self.arch}.{key}", default)

    def _hf_config(self) -> dict:
        """llama.cpp's metadata as the config.json of the same model (only the fields ModelConfig reads)."""
        family, _ = ARCHITECTURES[self.arch]
        m = self._meta
        if not m("expert_count"):
            raise UnsupportedArchitecture(f"{self.path}: {self.arch}.expert_count is missing: not a MoE GGUF")
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise CorruptFile(f"{self.path}: no token_embd.weight tensor")
        heads, hidden = int(m("attention.head_count")), int(m("embedding_length"))
        layers = int(m("block_count"))
        expert_ff = int(m("expert_feed_forward_length", 0) or m("feed_forward_length"))
        moe_layers = [f"blk.{i}.ffn_gate_inp.weight" in self.tensors for i in range(layers)]
        eps = float(
            f"{m('attention.layer_norm_rms_epsilon', 1e-5):.7g}"
        )  # stored as fp32: 1e-6 -> 9.99999997e-07
        eos = _field(self.reader, "tokenizer.ggml.eos_token_id")
        d = {
            "model_type": family,
            "vocab_size": int(embd.shape[1]),
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(m("attention.head_count_kv", heads)),
            "head_dim": int(m("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(m("context_length", 4096)),
            "rms_norm_eps": eps,
            "rope_theta": float(m("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": _field(self.reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "num_local_experts": int(m("expert_count")),
            "num_experts": int(m("expert_count")),
            "num_experts_per_tok": int(m("expert_used_count")),
            "intermediate_size": expert_ff
            if family in ("mixtral", "olmoe")
            else int(m("feed_forward_length", 0)),
            "moe_intermediate_size": expert_ff,
            "mlp_only_layers": [i for i, moe in enumerate(moe_layers) if not moe],
        }
        if family == "qwen2_moe":
            d["shared_expert_intermediate_size"] = int(m("expert_shared_feed_forward_length", 0))
            d["qkv_bias"] = "blk.0.attn_q.bias" in self.tensors
        if family == "olmoe" and m("attention.clamp_kqv") is not None:
            d["clip_qkv"] = float(m("attention.clamp_kqv"))
        if m("expert_weights_norm") is not None:  # llama.cpp states top-k renormalization when it differs
            d["norm_topk_prob"] = bool(m("expert_weights_norm"))
        elif family == "qwen3_moe":
            d["norm_topk_prob"] = True  # llama.cpp's qwen3moe always renormalizes
        return d

    def _index_experts(self) -> dict[tuple[int, int], dict[str, tuple]]:
        """(layer, expert) -> part -> (absolute offset, nbytes, qtype, shape [rows, cols])."""
        out: dict[tuple[int, int], dict[str, tuple]] = {}
        n_experts = self.config.num_experts
        for name, t in self.tensors.items():
            m = _BLOCK.match(name)
            if not m or m[2] not in EXPERT_PARTS or int(m[1]) >= self.config.num_layers:
                continue
            shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
            if len(shape) != 3 or shape[0] != n_experts:
                raise CorruptFile(
                    f"{self.path}: {name} has shape {shape}; expected ({n_experts}, rows, cols)"
                )
            per_expert = int(t.n_bytes) // n_experts
            for e in range(n_experts):
                part = (int(t.data_offset) + e * per_expert, per_expert, t.tensor_type, shape[1:])
                out.setdefault((int(m[1]), e), {})[EXPERT_PARTS[m[2]]] = part
        for layer, moe in enumerate(self.config.moe_layers):
            if moe and any(len(out.get((layer, e), {})) != 3 for e in range(n_experts)):
                raise CorruptFile(f"{self.path}: layer {layer} lacks one of {', '.join(EXPERT_PARTS)}")
        return out

    def _name(self, gguf_name: str) -> str | None:
        if gguf_name in GLOBAL_NAMES:
            return GLOBAL_NAMES[gguf_name]
        m = _BLOCK.match(gguf_name)
        if m and m[2] in LAYER_NAMES:
            return f"layers.{m[1]}.{LAYER_NAMES[m[2]]}"
        return None

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        c = self.config
        _, permuted = ARCHITECTURES[self.arch]
        sd = {}
        for gguf_name, t in self.tensors.items():
            m = _BLOCK.match(gguf_name)
            if m and (m[2] in EXPERT_PARTS or int(m[1]) >= c.num_layers):
                continue
            name = self._name(gguf_name)
            if name is None:
                if gguf_name == "rope_freqs.weight":
                    raise UnsupportedArchitecture(
                        f"{self.path}: rope_freqs (llama3 rope scaling) is not supported"
                    )
                raise CorruptFile(
                    f"{self.path}: tensor {gguf_name!r} is not known for a {self.arch} MoE GGUF"
                )
            w = dequantize(t.data, t.tensor_type, tuple(int(s) for s in reversed(t.shape)))
            if permuted and name.endswith("attn.q_proj.weight"):
                w = unpermute_rope(w, c.num_heads)
            elif permuted and name.endswith("attn.k_proj.weight"):
                w = unpermute_rope(w, c.num_kv_heads)
            elif name.endswith("shared_gate.weight"):
                w = w.reshape(1, -1)  # stored as a [D] vector
            sd[name] = w
        if "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["embed.weight"]
        return sd

    def expert_keys(self) -> list[tuple[int, int]]:
        return sorted(self.experts)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return sum(p[1] for p in self.experts[(layer, expert)].values())

    def read_expert(self, layer: int, expert: int, out: ExpertWeights | None = None) -> ExpertWeights:
        if (layer, expert) not in self.experts:
            raise MoepagerError(f"{self.path}: no expert {expert} in layer {layer}")
        weights = {}
        for part, (offset, nbytes, qtype, shape) in self.experts[(layer, expert)].items():
            weights[part] = dequantize(read_bytes(self.path, offset, nbytes), qtype, shape)
        if out is None:
            return weights
        for name, t in weights.items():
            out[name].copy_(t)
        return out
