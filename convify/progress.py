"""Progress bars: a tqdm bar on stderr when it is a terminal, nothing otherwise (logs, pipes and CI stay clean)."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator


@contextlib.contextmanager
def terminal_bar(enabled: bool = True, **options: Any) -> Iterator[Any]:
    """A tqdm bar (``options`` go to ``tqdm``: ``total``, ``desc``, ``unit``...) when ``enabled`` and stderr is a
    terminal, closed on exit; ``None`` otherwise, so a caller updates it only ``if bar is not None``.

    >>> with terminal_bar(total=3, desc="convify: work") as bar:
    ...     for _ in range(3):
    ...         if bar is not None:
    ...             bar.update(1)
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm.auto import tqdm  # noqa: PLC0415  (only on a terminal)

    bar = tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **options)
    try:
        yield bar
    finally:
        bar.close()
