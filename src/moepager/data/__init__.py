"""Offline English text for moefy calibration and for evaluation (provenance and licenses: README.md here).

Calibration and evaluation texts come from different sources and never overlap.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
EVAL_TEXT = HERE / "eval_gpl3.txt"  # the GNU GPL v3 text, verbatim


def calibration_text() -> str:
    """The Python language reference topics that ship with every CPython (pydoc_data.topics), joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
