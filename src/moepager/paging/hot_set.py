"""Hot set files: the experts to pin, saved from a run's most used (`--save-hot-set`) and read back
(`--hot-set`), checked against the model they were made for."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import MoepagerError
from ..model.config import ModelConfig

Key = tuple[int, int]  # (layer, expert)

HOT_SET_FORMAT = "moepager-hot-set"


def save_hot_set(path: str | Path, experts: Iterable[Key], config: ModelConfig) -> None:
    record = {"format": HOT_SET_FORMAT, "version": 1, "family": config.family, "num_layers": config.num_layers,
              "num_experts": config.num_experts, "experts": [list(k) for k in experts]}  # fmt: skip
    Path(path).write_text(json.dumps(record) + "\n")


def load_hot_set(path: str | Path, config: ModelConfig) -> list[Key]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoepagerError(f"hot set file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise MoepagerError(f"{path}: not a hot set file (invalid JSON: {e})") from None
    if not isinstance(record, dict) or record.get("format") != HOT_SET_FORMAT:
        raise MoepagerError(f'{path}: not a hot set file (no "format": "{HOT_SET_FORMAT}")')
    if record.get("version") != 1:
        raise MoepagerError(
            f"{path}: hot set version {record.get('version')!r} is not supported (expected 1)"
        )
    if (record.get("num_layers"), record.get("num_experts")) != (config.num_layers, config.num_experts):
        raise MoepagerError(
            f"{path}: hot set is for a model with {record.get('num_layers')} layers and {record.get('num_experts')} "
            f"experts, this one has {config.num_layers} and {config.num_experts}"
        )
    return [(int(k[0]), int(k[1])) for k in record["experts"]]
