"""The progress bar of every long command (the main job, `fora-fx eval`, `fora-fx bench`,
training): tqdm, on stderr, so stdout keeps only the results.

tqdm's `disable=None` turns the bar off when stderr is not a terminal: a log file, a pipe or
CI gets no carriage-return frames mixed into it. `quiet=True` (the commands' --quiet) turns
it off on a terminal too.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def bar(total: int | None, desc: str, quiet: bool = False, unit: str = "run") -> Any:
    """A tqdm bar: `with bar(n, "sampling") as b: ... b.update()`; `b.set_postfix_str(what)`
    says what runs now."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=False, disable=True if quiet else None)
