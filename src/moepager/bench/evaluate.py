"""Perplexity and greedy next-token agreement of a model on a text file: one yardstick for every lossy mode.

Owns only the measurement: the text is tokenized with the model's tokenizer, cut into consecutive windows of
`window` tokens, each scored from a fresh context (a full forward, no cache). It does not build models.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoepagerError


@dataclass
class EvalResult:
    tokens: int  # predicted tokens (each window's first token is context only)
    nll: float  # mean negative log-likelihood, nats per token
    agreement: float | None  # share of positions where greedy predictions equal the reference's

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "agreement": self.agreement,
        }


def text_windows(tokenizer, text: str, window: int, max_tokens: int | None) -> torch.Tensor:
    """Text -> [W, window] ids; the last partial window is dropped."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise MoepagerError(
            f"the text has {len(ids)} tokens, fewer than one window of {window}; lower --window"
        )
    return torch.tensor(ids[: n * window]).view(n, window)


@torch.inference_mode()
def evaluate(engine, text: str, reference=None, window: int = 512, max_tokens: int | None = None,
             progress: bool = True) -> EvalResult:  # fmt: skip
    """Perplexity of `engine` on `text`; with `reference`, the agreement of their greedy predictions."""
    from ..system.progress import progress_bar

    if engine.tokenizer is None:
        raise MoepagerError(f"{engine.path} has no tokenizer.json; evaluation needs one to read text")
    windows = text_windows(engine.tokenizer, text, window, max_tokens)
    if reference is not None and reference.config.vocab_size != engine.config.vocab_size:
        raise MoepagerError(
            "the reference model has a different vocabulary; agreement needs the same tokenizer"
        )
    nll, count, agree = 0.0, 0, 0
    for ids in progress_bar(windows, desc="eval", unit="window", enabled=progress):
        logits = engine.logits(ids[None])[0, :-1]  # [T-1, V]
        targets = ids[1:]
        nll += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
        if reference is not None:
            agree += (logits.argmax(-1) == reference.logits(ids[None])[0, :-1].argmax(-1)).sum().item()
    return EvalResult(count, nll / count, agree / count if reference is not None else None)


def main(model: str | Path, text_file: str | Path, reference: str | Path | None = None, max_tokens: int | None = None,
         window: int = 512, device: str = "cpu") -> EvalResult:  # fmt: skip
    path = Path(text_file)
    if not path.is_file():
        raise MoepagerError(f"no such text file: {path}")
    with tempfile.TemporaryDirectory() as workdir:
        engine = _load(model, device, Path(workdir) / "model")
        ref = _load(reference, device, Path(workdir) / "reference") if reference is not None else None
        return evaluate(engine, path.read_text(errors="replace"), ref, window, max_tokens)


def _load(model: str | Path, device: str, workdir: Path):
    """The model; a dense llama GGUF (the source of moefy, e.g. the default model's) is opened as moefy reads
    it: dequantized into a checkpoint folder in `workdir`, which lasts while it is used."""
    from .. import load
    from ..sources.catalog import gguf_header
    from ..sources.resolve import gguf_file

    gguf = gguf_file(model)
    if gguf is not None and gguf.is_file():
        header = gguf_header(gguf, {"general.architecture"}, expert_count=True)
        arch = header.get("general.architecture")
        if arch == "llama" and not header.get("llama.expert_count"):
            from ..moefy.build import dense_folder

            return load(dense_folder(gguf, workdir), device=device)
    return load(model, device=device)
