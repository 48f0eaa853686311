"""moepager: run Mixture-of-Experts models larger than memory by paging their experts from disk.

The public API: `load(model, **options)` -> Engine (options: runtime/options.py), and MoepagerError. The package's
parts and the arrows between them: docs/architecture.md.
"""

from .errors import MoepagerError
from .runtime.engine import Engine
from .runtime.options import EngineOptions

__all__ = ["Engine", "EngineOptions", "MoepagerError", "load"]
__version__ = "0.1.0"


def load(model=None, options: EngineOptions | None = None, **flat) -> Engine:
    """Load MODEL (a checkpoint folder, store, GGUF file, ollama name or cached hub id, or an opened source;
    None or "default": the embedded default model, built on first use) with `options`, or the same options by
    their flat names: load(model, expert_memory="25%"). See runtime/engine.py `load` and runtime/options.py."""
    from .moefy.default_model import default_model_path, is_default
    from .runtime.engine import load as load_engine

    options = EngineOptions.of(options, **flat)  # bad options refused before the default model is built
    if is_default(model):
        model = default_model_path()
    if is_default(options.speculation.speculate or ""):  # the default model as the draft model
        options = EngineOptions.of(options, speculate=str(default_model_path()))
    return load_engine(model, options)
