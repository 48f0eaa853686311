"""Progress bars on a terminal only: piped or redirected stderr gets none (a bar there is one ever-growing
line of carriage returns, tens of KB in a log)."""

from __future__ import annotations

import sys


def progress_bar(iterable=None, enabled: bool = True, **options):
    """tqdm(iterable, **options), shown only when enabled and stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), **options)
