"""moepager: run Mixture-of-Experts models larger than memory by paging their experts from disk."""

from .engine import Engine, load
from .errors import MoepagerError

__all__ = ["Engine", "MoepagerError", "load"]
__version__ = "0.1.0"
