"""GgufSource: the ModelSource of a MoE GGUF file (llama.cpp's layout), read in place.

Owns the translation from llama.cpp's tensor names and `{arch}.*` metadata to moepager's names and a
config.json-like dict (so ModelConfig's one translation table still decides the architecture), and reading
one routed expert as three byte ranges of the stacked `ffn_{gate,up,down}_exps` tensors (expert dimension
outermost, so each expert's matrix is one contiguous range; GPT-OSS adds three bias ranges), through the
O_DIRECT reader. DeepSeek-V3 files (`deepseek2`) get MLA's kv_b_proj put back from llama.cpp's k_b/v_b split.

Compact (the default): matrices in a format the kernels compute from (kernels/ggml.py: llama.cpp's quantized
types, and fp16 and float32 rows, so that a float GGUF is computed as llama.cpp computes it too) stay as their
bytes, uint8 [rows, row bytes]: experts (`expert_formats` says which and how, per layer: a Q4_K_M file mixes
types across layers) and the dense matrices of attention, shared experts, embeddings and output
(`compact_dense`). Norms, routers and biases, other types, and everything when compact=False, are dequantized
exactly as gguf.quants does (F32/F16/BF16 keep their dtype).
Its tokenizer is built from the file's metadata by generation/gguf_tokenizer.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CorruptFile, MoepagerError, UnsupportedArchitecture
from ..generation.gguf_tokenizer import gguf_tokenizer, read_metadata
from ..generation.tokenizer import Tokenizer
from ..kernels.ggml import MUL_MAT_TYPES
from ..model.compact import LATENT_PARTS
from ..model.config import config_from_hf
from ..model.moe import ExpertWeights
from ..system.direct_reader import CHUNK, DirectReader, copy_piece, offer_or_copy
from .gguf_file import dequantize, read_header

# llama.cpp name (after "blk.N.") -> moepager name (after "layers.N."); the one table for GGUF names
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight", "attn_q.bias": "attn.q_proj.bias",
    "attn_k.weight": "attn.k_proj.weight", "attn_k.bias": "attn.k_proj.bias",
    "attn_v.weight": "attn.v_proj.weight", "attn_v.bias": "attn.v_proj.bias",
    "attn_output.weight": "attn.o_proj.weight", "attn_output.bias": "attn.o_proj.bias",
    "attn_sinks.weight": "attn.sinks",  # GPT-OSS
    "post_attention_norm.weight": "ffn_norm.weight",  # GPT-OSS names its pre-FFN norm so
    "attn_q_a.weight": "attn.q_a_proj.weight",  # DeepSeek MLA
    "attn_q_a_norm.weight": "attn.q_a_layernorm.weight",
    "attn_q_b.weight": "attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "attn.kv_b_proj.weight",  # older files; newer ones split it (MLA_SPLIT)
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    "ffn_gate_inp.weight": "ffn.router.weight", "ffn_gate_inp.bias": "ffn.router.bias",
    "exp_probs_b.bias": "ffn.router.e_score_correction_bias",
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
# moepager names of linear layers whose GGUF blocks stay compact
COMPACT_SUFFIXES = ("_proj.weight", "_proj_with_mqa.weight")
EXPERT_PARTS = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}
EXPERT_MATRICES = frozenset(EXPERT_PARTS.values())
EXPERT_BIASES = {
    "ffn_gate_exps.bias": "gate_bias",
    "ffn_up_exps.bias": "up_bias",
    "ffn_down_exps.bias": "down_bias",
}
# DeepSeek's kv_b_proj as llama.cpp's converter splits it: k_b [H, kv_rank, nope] (transposed), v_b [H, dv, kv_rank]
MLA_SPLIT = ("attn_k_b.weight", "attn_v_b.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)$")
# general.architecture -> (HF model_type, rows of q/k permuted by llama.cpp for its interleaved rope)
ARCHITECTURES = {
    "llama": ("mixtral", True),
    "qwen2moe": ("qwen2_moe", False),
    "qwen3moe": ("qwen3_moe", False),
    "olmoe": ("olmoe", False),
    # rope pairs interleaved in both: rows as in the checkpoint; softmax-routed files are DeepSeek-V2's
    "deepseek2": ("deepseek_v3", False),
    "gpt-oss": ("gpt_oss", False),
}
DEEPSEEK = ("deepseek_v2", "deepseek_v3")  # the families of a deepseek2 file (_softmax_routed tells which)


def moepager_name(gguf_name: str) -> str | None:
    """llama.cpp's name of a tensor -> moepager's (None for tensors moepager does not read by name)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m[2] in LAYER_NAMES:
        return f"layers.{m[1]}.{LAYER_NAMES[m[2]]}"
    return None


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time q/k row permutation (its interleaved pairs -> Hugging Face's halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GgufSource:
    """A MoE GGUF file. Experts are read by byte range from the file; dense tensors are read once."""

    def __init__(self, path: str | Path, reader: DirectReader | None = None, compact: bool = True):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise MoepagerError(f"no such GGUF file: {self.path}")
        self.fields, self.tensors = read_header(self.path)
        arch = self.fields.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"{self.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        self.arch = arch
        self.raw_config = self._hf_config()
        self.config = config_from_hf(self.raw_config)
        self.config.routing_order = "llama.cpp"  # near-tied routing picks as the file's reference does
        if self.config.family == "deepseek_v2":  # llama.cpp's deepseek2 graph, not transformers' DeepSeek-V2:
            self.config.group_score = "top2_sum"  # groups scored as V3's
            self.config.norm_topk_prob = bool(self._meta("expert_weights_norm", False))
        self.experts = self._index_experts()
        self.compact = compact
        self.tokenizer_metadata = read_metadata(self.fields)
        largest = max((self.expert_nbytes(*k) for k in self.experts), default=0)
        self.reader = reader or DirectReader(buffer_bytes=min(largest, CHUNK))

    def tokenizer(self) -> Tokenizer | None:
        """The file's own tokenizer and chat template (None when it carries no vocabulary)."""
        return gguf_tokenizer(self.tokenizer_metadata)

    def _meta(self, key: str, default=None):
        return self.fields.get(f"{self.arch}.{key}", default)

    def _hf_config(self) -> dict:
        """llama.cpp's metadata as the config.json of the same model (only the fields ModelConfig reads)."""
        family, _ = ARCHITECTURES[self.arch]
        m = self._meta
        if family == "deepseek_v3" and self._softmax_routed():
            family = "deepseek_v2"
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
        eos = self.fields.get("tokenizer.ggml.eos_token_id")
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
            "bos_token_id": self.fields.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "num_local_experts": int(m("expert_count")),
            "num_experts": int(m("expert_count")),
            "num_experts_per_tok": int(m("expert_used_count")),
            "intermediate_size": expert_ff
            if family in ("mixtral", "olmoe", "gpt_oss")
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
        d.update(self._rope_scaling(family))
        if family in DEEPSEEK:
            d.update(self._mla_config())
        if family == "gpt_oss":
            d["sliding_window"] = int(m("attention.sliding_window"))
            # llama.cpp's gpt-oss pattern (and the checkpoints'): even layers slide, odd ones see everything
            d["layer_types"] = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
            ]
        return d

    def _rope_scaling(self, family: str) -> dict:
        m, kind = self._meta, self._meta("rope.scaling.type", "none")
        if kind == "none":
            return {}
        if kind != "yarn":
            raise UnsupportedArchitecture(
                f"{self.path}: rope scaling {kind!r} is not supported in GGUF files"
            )
        rope = {"rope_type": "yarn", "rope_theta": float(m("rope.freq_base", 10000.0)),
                "factor": float(m("rope.scaling.factor")),
                "original_max_position_embeddings": int(m("rope.scaling.original_context_length")),
                "beta_fast": float(m("rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(m("rope.scaling.yarn_beta_slow", 1.0))}  # fmt: skip
        if family == "gpt_oss":
            rope["truncate"] = False  # GPT-OSS's YaRN keeps the correction range unrounded
        if family in DEEPSEEK and m("rope.scaling.yarn_log_multiplier"):
            # the converter writes 0.1 * mscale_all_dim; DeepSeek's checkpoints set mscale equal to it
            rope["mscale_all_dim"] = rope["mscale"] = float(
                f"{m('rope.scaling.yarn_log_multiplier') / 0.1:.6g}"
            )
        return {"rope_parameters": rope}

    def _softmax_routed(self) -> bool:
        """Whether a deepseek2 file routes by a softmax (DeepSeek-V2) rather than V3's sigmoid. llama.cpp's rule:
        the stated gating function (1 softmax, 2 sigmoid), else softmax; V3 files that state none carry V3's
        score correction bias."""
        gating = self._meta("expert_gating_func")
        if gating not in (None, 1, 2):
            raise UnsupportedArchitecture(
                f"{self.path}: deepseek2.expert_gating_func is {gating}; moepager runs 1 (softmax) and 2 (sigmoid)"
            )
        biased = any(name.endswith("exp_probs_b.bias") for name in self.tensors)
        return gating == 1 or (gating is None and not biased)

    def _mla_config(self) -> dict:
        """DeepSeek-V2/V3's attention and routing fields from llama.cpp's deepseek2 metadata."""
        m = self._meta
        rope = int(m("rope.dimension_count"))
        if m("attention.key_length_mla") is not None:  # files with the split kv_b state the per-head sizes so
            nope, dv = int(m("attention.key_length_mla")) - rope, int(m("attention.value_length_mla"))
        else:
            nope, dv = int(m("attention.key_length")) - rope, int(m("attention.value_length"))
        q_rank = m("attention.q_lora_rank")
        return {
            "q_lora_rank": int(q_rank) if q_rank else None,
            "kv_lora_rank": int(m("attention.kv_lora_rank")),
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": nope,
            "v_head_dim": dv,
            "n_routed_experts": int(m("expert_count")),
            "n_shared_experts": int(m("expert_shared_count", 0)),
            "n_group": int(m("expert_group_count", 1)),
            "topk_group": int(m("expert_group_used_count", 1)),
            "routed_scaling_factor": float(m("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(m("expert_weights_norm", False)),  # written only when true
            "first_k_dense_replace": int(m("leading_dense_block_count", 0)),
            "rope_interleave": True,
            # llama.cpp picks experts greedily within the best groups whenever it has groups
            "topk_method": "group_limited_greedy" if int(m("expert_group_count", 1)) > 1 else "greedy",
        }

    def _index_experts(self) -> dict[tuple[int, int], dict[str, tuple]]:
        """(layer, expert) -> part -> (absolute offset, nbytes, qtype, shape [rows, cols])."""
        out: dict[tuple[int, int], dict[str, tuple]] = {}
        n_experts = self.config.num_experts
        parts = {**EXPERT_PARTS, **EXPERT_BIASES}
        for name, t in self.tensors.items():
            m = _BLOCK.match(name)
            if not m or m[2] not in parts or int(m[1]) >= self.config.num_layers:
                continue
            shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
            if len(shape) != (3 if m[2] in EXPERT_PARTS else 2) or shape[0] != n_experts:
                raise CorruptFile(
                    f"{self.path}: {name} has shape {shape}; expected {n_experts} experts outermost"
                )
            per_expert = int(t.n_bytes) // n_experts
            for e in range(n_experts):
                part = (int(t.data_offset) + e * per_expert, per_expert, t.tensor_type, shape[1:])
                out.setdefault((int(m[1]), e), {})[parts[m[2]]] = part
        for layer, moe in enumerate(self.config.moe_layers):
            if moe and any(
                not {"gate", "up", "down"} <= set(out.get((layer, e), {})) for e in range(n_experts)
            ):
                raise CorruptFile(f"{self.path}: layer {layer} lacks one of {', '.join(EXPERT_PARTS)}")
        return out

    def _name(self, gguf_name: str) -> str | None:
        return moepager_name(gguf_name)

    def _dense_tensors(self):
        """(moepager name, GGUF tensor) of every resident tensor."""
        c = self.config
        for gguf_name, t in self.tensors.items():
            m = _BLOCK.match(gguf_name)
            if m and (
                m[2] in EXPERT_PARTS
                or m[2] in EXPERT_BIASES
                or m[2] in MLA_SPLIT
                or int(m[1]) >= c.num_layers
            ):
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
            yield name, t

    def _keeps_blocks(self, name: str, qtype) -> bool:
        """Matrices of linear layers (and the embedding) in a format the kernels compute from. An older file's
        whole MLA kv_b is not: its rows run over the latent, and MLA is computed with k_b over the heads' dims."""
        if name == "embed.weight":  # rows looked up by ggml's to_float, a block type's
            return self._blocks(qtype)
        matrix = name.endswith(COMPACT_SUFFIXES) or name == "lm_head.weight"
        return matrix and self._products(qtype) and not name.endswith("kv_b_proj.weight")

    def _products(self, qtype) -> bool:
        """A dense matrix computed by ggml's products as llama.cpp computes it: the block types, fp16 rows,
        whose products round the activations to fp16 (llama.cpp's quantizer leaves fp16 the matrices whose
        rows are no whole number of blocks), and float32 rows."""
        return self.compact and qtype in MUL_MAT_TYPES

    def _latent_split(self, layer: int) -> list | None:
        """A layer's MLA k_b and v_b tensors when both stay compact (LatentKV's products run on them as
        llama.cpp runs its own: fp16 parts too, which its quantizer leaves where rows are no whole block)."""
        parts = [self.tensors.get(f"blk.{layer}.{n}") for n in MLA_SPLIT]
        if all(t is not None and self._products(t.tensor_type) for t in parts):
            return parts
        return None

    def _read(self, t) -> torch.Tensor:
        """A tensor's bytes, uint8 [n_bytes], read past the page cache into memory we own."""
        out = torch.empty(int(t.n_bytes), dtype=torch.uint8)
        for pos, view in self.reader.read_chunks(self.path, int(t.data_offset), int(t.n_bytes)):
            copy_piece(out, pos, view)  # staged a chunk at a time: an embedding can be hundreds of MiB
        return out

    def _fix(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Undo llama.cpp's convert-time changes (rows of blocks permute like rows of floats)."""
        _, permuted = ARCHITECTURES[self.arch]
        if permuted and name.endswith("attn.q_proj.weight"):
            return unpermute_rope(w, self.config.num_heads)
        if permuted and name.endswith("attn.k_proj.weight"):
            return unpermute_rope(w, self.config.num_kv_heads)
        if name.endswith("shared_gate.weight"):
            return w.reshape(1, -1)  # stored as a [D] vector
        return w

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every resident tensor as floats, except those `compact_dense` keeps as blocks."""
        sd = {}
        for name, t in self._dense_tensors():
            if not self._keeps_blocks(name, t.tensor_type):
                shape = tuple(int(s) for s in reversed(t.shape))
                sd[name] = self._fix(name, dequantize(self._read(t), t.tensor_type, shape))
        for layer in range(self.config.num_layers):
            if f"blk.{layer}.{MLA_SPLIT[0]}" in self.tensors and self._latent_split(layer) is None:
                sd[f"layers.{layer}.attn.kv_b_proj.weight"] = self._kv_b(layer)
        if "lm_head.weight" not in sd and "lm_head.weight" not in self._compact_names():
            if "embed.weight" in sd:
                sd["lm_head.weight"] = sd["embed.weight"]
        self.reader.release_buffer()  # expert reads, which follow, need far less staging than a whole tensor
        return sd

    def _kv_b(self, layer: int) -> torch.Tensor:
        """DeepSeek's kv_b_proj [H * (nope + dv), kv_rank] put back together from llama.cpp's k_b and v_b."""
        k_t, v_t = (self.tensors[f"blk.{layer}.{n}"] for n in MLA_SPLIT)
        k = dequantize(self._read(k_t), k_t.tensor_type, tuple(int(s) for s in reversed(k_t.shape)))
        v = dequantize(self._read(v_t), v_t.tensor_type, tuple(int(s) for s in reversed(v_t.shape)))
        kv = torch.cat([k.transpose(1, 2), v], dim=1)  # [H, nope + dv, kv_rank]
        return kv.reshape(-1, kv.shape[-1]).contiguous()

    def _compact_names(self) -> set[str]:
        names = {n for n, t in self._dense_tensors() if self._keeps_blocks(n, t.tensor_type)}
        if "output.weight" not in self.tensors and "embed.weight" in names:
            names.add("lm_head.weight")  # tied: the embedding's blocks
        return names

    def compact_dense(self) -> dict[str, tuple[int, torch.Tensor, tuple[int, int]]]:
        """Dense matrices kept as blocks: moepager weight name -> (qtype, bytes uint8 [rows, row bytes],
        (rows, cols)). A tied output shares the embedding's bytes."""
        out = {}
        for name, t in self._dense_tensors():
            if self._keeps_blocks(name, t.tensor_type):
                rows, cols = (int(s) for s in reversed(t.shape))
                raw = self._fix(name, self._read(t).view(rows, -1))
                out[name] = (int(t.tensor_type), raw, (rows, cols))
        for layer in range(self.config.num_layers):
            for t, part in zip(self._latent_split(layer) or (), LATENT_PARTS):
                heads, rows, cols = (int(s) for s in reversed(t.shape))
                raw = self._read(t).view(heads * rows, -1)
                out[f"layers.{layer}.attn.kv_b_proj{part}"] = (int(t.tensor_type), raw, (heads * rows, cols))
        if "lm_head.weight" in self._compact_names() and "lm_head.weight" not in out:
            out["lm_head.weight"] = out["embed.weight"]
        self.reader.release_buffer()
        return out

    def embedding_rows(self):
        """ids (int64 [n]) -> the token embedding's rows, uint8 [n, row bytes], read from the file on each call
        (O_DIRECT, neighbouring rows in one read) for a model that does not hold the table
        (BlockEmbedding.rows_from_file); None where the embedding is not kept as blocks."""
        t = self.tensors.get("token_embd.weight")
        if t is None or "embed.weight" not in self._compact_names():
            return None
        vocab = int(t.shape[1])
        row_bytes, start = int(t.n_bytes) // vocab, int(t.data_offset)

        def read(ids: torch.Tensor) -> torch.Tensor:
            wanted = ids.tolist()
            unique = sorted(set(wanted))
            if unique and not 0 <= unique[0] <= unique[-1] < vocab:
                raise IndexError(f"token id {unique[0] if unique[0] < 0 else unique[-1]} is outside the "
                                 f"vocabulary of {vocab} of {self.path}")  # fmt: skip
            views = self.reader.read_ranges([(self.path, start + i * row_bytes, row_bytes) for i in unique])
            rows = {i: torch.frombuffer(v, dtype=torch.uint8) for i, v in zip(unique, views)}
            return torch.stack([rows[i] for i in wanted])  # copies out of the reader's staging buffer

        return read

    def expert_keys(self) -> list[tuple[int, int]]:
        return sorted(self.experts)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return sum(p[1] for p in self.experts[(layer, expert)].values())

    def _blocks(self, qtype) -> bool:
        """Kept as the file's blocks: compact reading asked for, and a type the kernels compute from (fp16 rows
        too, whose products round the activations to fp16 as llama.cpp's do, and float32 rows)."""
        return self.compact and qtype in MUL_MAT_TYPES

    def _expert_blocks(self, part: str, qtype) -> bool:
        """An expert part kept as blocks: a matrix (not a bias) of a type the kernels compute from."""
        return part in EXPERT_MATRICES and self._blocks(qtype)

    def expert_formats(self) -> dict[str, dict[int, tuple[int, int, int]]]:
        """Expert matrices kept as blocks: part -> {layer: (qtype, rows, row bytes)}. A part is listed only
        when every layer keeps it as blocks (one bank holds the slots of every layer)."""
        out: dict[str, dict[int, tuple[int, int, int]]] = {}
        first = {}
        for (layer, e), parts in self.experts.items():
            if e == 0:
                for part, (_, nbytes, qtype, shape) in parts.items():
                    first.setdefault(part, {})[layer] = (int(qtype), shape[0], nbytes // shape[0])
        for part, layers in first.items():
            if all(self._expert_blocks(part, q) for q, _, _ in layers.values()):
                out[part] = layers
        return out

    def read_experts(self, keys: list[tuple[int, int]], outs: list[ExpertWeights], land=None) -> None:
        """Fill each out with its expert, reading all of them together (see BatchedSource.read_experts): blocks
        land in their flat slot buffers piece by piece (or are offered to `land` whole); experts with float
        parts go one by one."""
        whole, one_by_one = [], []
        for j, (key, out) in enumerate(zip(keys, outs)):
            parts = self.experts[key]
            flat = all(self._expert_blocks(p, q) and out[p].dtype == torch.uint8 and out[p].dim() == 1
                       for p, (_, _, q, _) in parts.items())  # fmt: skip
            if flat:
                whole.append((j, key, out))
            else:
                one_by_one.append((key, out))
        ranges = [(self.path, off, n) for _, key, _ in whole for off, n, _, _ in self.experts[key].values()]
        dests = [(j, p, out[p]) for j, key, out in whole for p in self.experts[key]]
        for i, pos, view in self.reader.read_pieces(ranges):
            offer_or_copy(land, *dests[i], pos, view, ranges[i][2])
        for key, out in one_by_one:
            self.read_expert(*key, out=out)

    def read_expert(self, layer: int, expert: int, out: ExpertWeights | None = None) -> ExpertWeights:
        """Blocks (uint8 [rows, row bytes]) for the parts in expert_formats, floats for the rest. A block
        destination may be a flat byte buffer at least as long as the part (a bank slot sized for the
        largest layer): the part fills its start."""
        if (layer, expert) not in self.experts:
            raise MoepagerError(f"{self.path}: no expert {expert} in layer {layer}")
        parts = self.experts[(layer, expert)]
        views = self.reader.read_ranges(
            [(self.path, offset, nbytes) for offset, nbytes, _, _ in parts.values()]
        )
        weights = {}
        for (part, (_, nbytes, qtype, shape)), view in zip(parts.items(), views):
            raw = torch.frombuffer(view, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
            if self._expert_blocks(part, qtype):
                if out is not None and out[part].dtype == torch.uint8 and out[part].dim() == 1:
                    out[part][:nbytes].copy_(raw)
                    continue
                weights[part] = raw.view(shape[0], -1)
            else:
                weights[part] = dequantize(raw, qtype, shape)
        if out is None:  # the views point into this thread's staging buffer: copy what we return
            return {name: t.clone() if t.dtype == torch.uint8 else t for name, t in weights.items()}
        for name, t in weights.items():
            out[name].copy_(t)
        return out
