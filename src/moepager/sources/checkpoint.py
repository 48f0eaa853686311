"""A Hugging Face checkpoint: where it is, its config, and its tensors split into resident and expert parts.

The one table translating hub tensor names to moepager's lives here (NAME_RULES). Routed experts are
described as byte ranges (ExpertPart), one list per (layer, expert), so any reader can fetch an expert alone;
`decode_expert` turns the raw tensors of one expert into the canonical form of the experts contract.
Experts are read in place from the original safetensors files through a DirectReader (O_DIRECT, no page cache).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..model.config import ModelConfig, config_from_hf
from ..model.moe import ExpertWeights
from ..system.direct_reader import (
    CHUNK,
    DirectReader,
    Scratch,
    bounded_groups,
    copy_piece,
    flat_bytes,
    offer_or_copy,
    takes_bytes,
)
from ..system.safetensors import TensorInfo, read_index, read_tensor

# hub name (regex, anchored) -> moepager name. Layer index is group 1 where present.
_L = r"model\.layers\.(\d+)\."
NAME_RULES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.(weight|bias)", r"norm.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
    (_L + r"input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (_L + r"post_attention_layernorm\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
    (_L + r"self_attn\.(.+)", r"layers.\1.attn.\2"),
    (_L + r"(?:mlp|block_sparse_moe)\.(?:gate|router)\.(weight|bias|e_score_correction_bias)",
     r"layers.\1.ffn.router.\2"),
    (_L + r"mlp\.shared_experts?\.(gate_proj|up_proj|down_proj)\.weight", r"layers.\1.ffn.shared.\2.weight"),
    (_L + r"mlp\.shared_expert_gate\.weight", r"layers.\1.ffn.shared_gate.weight"),
    (_L + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", r"layers.\1.ffn.\2.weight"),
]  # fmt: skip
_RULES = [(re.compile(p + "$"), r) for p, r in NAME_RULES]

# the same table read backwards: moepager dense name (regex) -> hub name; {router}, {shared} depend on the family
_BACK = [
    (r"embed\.weight", r"model.embed_tokens.weight"),
    (r"norm\.(weight|bias)", r"model.norm.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)", r"model.layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.ffn_norm\.(weight|bias)", r"model.layers.\1.post_attention_layernorm.\2"),
    (r"layers\.(\d+)\.attn\.(.+)", r"model.layers.\1.self_attn.\2"),
    (r"layers\.(\d+)\.ffn\.router\.(.+)", r"model.layers.\1.{router}.\2"),
    (r"layers\.(\d+)\.ffn\.shared\.(.+)", r"model.layers.\1.mlp.{shared}.\2"),
    (r"layers\.(\d+)\.ffn\.shared_gate\.weight", r"model.layers.\1.mlp.shared_expert_gate.weight"),
    (r"layers\.(\d+)\.ffn\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
]  # fmt: skip
_BACK_RULES = [(re.compile(p + "$"), r) for p, r in _BACK]


def hub_name(name: str, family: str) -> str:
    router = {"mixtral": "block_sparse_moe.gate", "phimoe": "block_sparse_moe.gate", "gpt_oss": "mlp.router"}
    shared = "shared_experts" if family in ("deepseek_v2", "deepseek_v3") else "shared_expert"
    for pattern, repl in _BACK_RULES:
        if m := pattern.match(name):
            return m.expand(repl.format(router=router.get(family, "mlp.gate"), shared=shared))
    raise MoepagerError(f"dense tensor {name!r} has no Hugging Face name for a {family} model")


# routed experts: one tensor per expert and matrix, or all experts of a layer stacked (GPT-OSS)
_EXPERT = re.compile(
    _L + r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_STACKED = re.compile(_L + r"mlp\.experts\.(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)$")
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
RAW_ALIGN = 64  # raw tensors sit at this alignment in a scratch buffer, so any dtype can view them


@dataclass(frozen=True)
class ExpertPart:
    """One tensor of one expert: a contiguous byte range of a checkpoint file."""

    part: str  # gate/up/down (per-expert files) or gate_up_proj/... (stacked, decoded by decode_expert)
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def decode_expert(raw: dict[str, torch.Tensor]) -> ExpertWeights:
    """Raw tensors of one expert, as stored -> gate [I, D], up [I, D], down [D, I] (+ biases)."""
    if "gate_up_proj" not in raw:
        return dict(raw)
    gate_up = raw["gate_up_proj"]  # [D, 2I], gate and up interleaved along the last dim
    out = {"gate": gate_up[:, 0::2].t().contiguous(), "up": gate_up[:, 1::2].t().contiguous()}
    out["down"] = raw["down_proj"].t().contiguous()  # stored [I, D]
    if "gate_up_proj_bias" in raw:
        out["gate_bias"] = raw["gate_up_proj_bias"][0::2].contiguous()
        out["up_bias"] = raw["gate_up_proj_bias"][1::2].contiguous()
    if "down_proj_bias" in raw:
        out["down_bias"] = raw["down_proj_bias"]
    return out


def resolve(model: str | Path) -> Path:
    """A checkpoint folder, or a hub repo id found in the local Hugging Face cache (never downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MoepagerError(f"{path} is a file; give the checkpoint folder that holds config.json")
    text = str(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            raise MoepagerError(
                f"{text!r} is not a folder and not in the local Hugging Face cache; "
                f"download it first (hf download {text}) or pass a checkpoint folder"
            ) from None
    raise MoepagerError(f"no such model folder: {path}")


def read_config(folder: Path) -> tuple[ModelConfig, dict]:
    path = folder / "config.json"
    if not path.exists():
        raise MoepagerError(f"{folder}: no config.json; is this a Hugging Face checkpoint folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoepagerError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(raw), raw


class Checkpoint:
    """A safetensors checkpoint folder, indexed by byte range."""

    def __init__(self, model: str | Path, reader: DirectReader | None = None):
        self.path = resolve(model)
        self.config, self.raw_config = read_config(self.path)
        self.tensors = read_index(self.path)
        self.dense: dict[str, TensorInfo] = {}
        self.experts: dict[tuple[int, int], list[ExpertPart]] = {}
        for info in self.tensors.values():
            self._classify(info)
        self._check_complete()
        largest = max((self.expert_nbytes(*k) for k in self.experts), default=0)
        self.reader = reader or DirectReader(buffer_bytes=min(largest, CHUNK))
        self._scratch = Scratch()  # per reading thread: experts assembled before they are decoded

    def _classify(self, info: TensorInfo) -> None:
        name, n_layers = info.name, self.config.num_layers
        if m := _EXPERT.match(name):
            layer, e = int(m[1]), int(m[2])
            if layer < n_layers:
                part = ExpertPart(_PART[m[3]], info.file, info.offset, info.nbytes, info.dtype, info.shape)
                self.experts.setdefault((layer, e), []).append(part)
            return
        if m := _STACKED.match(name):
            layer = int(m[1])
            if layer < n_layers:
                per_expert = info.nbytes // info.shape[0]
                for e in range(info.shape[0]):
                    part = ExpertPart(m[2], info.file, info.offset + e * per_expert, per_expert, info.dtype,
                                      info.shape[1:])  # fmt: skip
                    self.experts.setdefault((layer, e), []).append(part)
            return
        for pattern, repl in _RULES:
            if m := pattern.match(name):
                if m.re.groups and m[1].isdigit() and int(m[1]) >= n_layers:
                    return  # e.g. DeepSeek's multi-token-prediction layer, not part of the decoder
                self.dense[m.expand(repl)] = info
                return
        if not _IGNORED.match(name):
            raise MoepagerError(f"{self.path}: tensor {name!r} is not known for a {self.config.family} model")

    def _check_complete(self) -> None:
        c = self.config
        for layer in range(c.num_layers):
            if not c.moe_layers[layer]:
                continue
            for e in range(c.num_experts):
                if (layer, e) not in self.experts:
                    raise MoepagerError(
                        f"{self.path}: expert {e} of layer {layer} is missing from the checkpoint"
                    )

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {name: read_tensor(info) for name, info in self.dense.items()}
        if self.config.tie_embeddings or "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["embed.weight"]
        return sd

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return sum(p.nbytes for p in self.experts[(layer, expert)])

    def expert_keys(self) -> list[tuple[int, int]]:
        return sorted(self.experts)

    def read_expert(self, layer: int, expert: int, out: ExpertWeights | None = None) -> ExpertWeights:
        if out is not None:
            self.read_experts([(layer, expert)], [out])
            return out
        parts = self.experts[(layer, expert)]
        views = self.reader.read_ranges([(p.file, p.offset, p.nbytes) for p in parts])
        # views into this thread's staging buffer: valid until its next read, so copy before returning
        raw = {p.part: _tensor(v, p.dtype, p.shape) for p, v in zip(parts, views)}
        return {name: t.clone() for name, t in decode_expert(raw).items()}

    def read_experts(self, keys: list[tuple[int, int]], outs: list[ExpertWeights], land=None) -> None:
        """Fill each out with its expert, reading all of them together (see BatchedSource.read_experts)."""
        as_stored, decoded = [], []
        for j, (key, out) in enumerate(zip(keys, outs)):
            parts = self.experts[key]
            ok = all(takes_bytes(out.get(p.part), p.dtype, p.shape) for p in parts)
            if ok:
                as_stored.append((j, parts, out))
            else:
                decoded.append((parts, out))
        if as_stored:  # canonical tensors: each lands in its destination piece by piece (or is offered whole)
            ranges = [(p.file, p.offset, p.nbytes) for _, parts, _ in as_stored for p in parts]
            dests = [(j, p.part, flat_bytes(out[p.part])) for j, parts, out in as_stored for p in parts]
            for i, pos, view in self.reader.read_pieces(ranges):
                offer_or_copy(land, *dests[i], pos, view, ranges[i][2])
        sizes = [sum(_align_up(p.nbytes, RAW_ALIGN) for p in parts) for parts, _ in decoded]
        for group in bounded_groups(decoded, sizes, self.reader.chunk_bytes):  # bounds the scratch buffer
            self._read_decoded(group)

    def _read_decoded(self, group: list[tuple[list[ExpertPart], ExpertWeights]]) -> None:
        """Experts stored in another form (GPT-OSS's stacked rows) or asked for in another dtype: their raw
        tensors are read together into this thread's scratch buffer, then decoded and copied."""
        places, at = [], 0
        for parts, _ in group:
            for p in parts:
                places.append(at)
                at = _align_up(at + p.nbytes, RAW_ALIGN)
        scratch = self._scratch.get(at)
        ranges = [(p.file, p.offset, p.nbytes) for parts, _ in group for p in parts]
        for i, pos, view in self.reader.read_pieces(ranges):
            copy_piece(scratch, places[i] + pos, view)
        i = 0
        for parts, out in group:
            raw = {}
            for p in parts:
                raw[p.part] = scratch[places[i] : places[i] + p.nbytes].view(p.dtype).view(p.shape)
                i += 1
            for name, t in decode_expert(raw).items():
                out[name].copy_(t)


def _align_up(x: int, align: int) -> int:
    return (x + align - 1) // align * align


def _tensor(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if len(view) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(shape)
