"""Progress bars: rich bars on a terminal, tqdm's widgets in a notebook, silence when disabled.

>>> with progress_bar(3, "units", enabled=False) as advance:
...     advance(1)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def in_notebook() -> bool:
    """Whether the code runs in a Jupyter kernel (where a console bar would print line after line)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar with counts, elapsed and remaining time when enabled.

    In a notebook the bar is a ``tqdm.auto`` widget; elsewhere a rich console bar (transient)."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    if in_notebook():
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=description) as widget:
            yield widget.update
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
