"""Progress on a terminal: a tqdm bar when stderr is one, nothing otherwise (ingest, indexing)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def progress_bar(total: int, unit: str, desc: str) -> Callable[[int], None]:
    """A callback advancing a tqdm bar when stderr is a terminal; a no-op otherwise."""
    if not sys.stderr.isatty():
        return lambda _n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance
