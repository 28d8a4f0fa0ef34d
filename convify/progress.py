"""Progress bars: a tqdm bar on stderr when it is a terminal, nothing otherwise (logs, pipes and CI stay clean)."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any, Iterator, TextIO


@contextlib.contextmanager
def terminal_bar(enabled: bool = True, **options: Any) -> Iterator[Any]:
    """A tqdm bar (``options`` go to ``tqdm``: ``total``, ``desc``, ``unit``...) when ``enabled`` and stderr is a
    terminal, closed on exit; ``None`` otherwise, so a caller updates it only ``if bar is not None``.

    The bar writes to its own copy of stderr's file descriptor, so that code that silences descriptor 2 for a
    while (the ONNX exporters' C++ prints, see ``convify.export.quiet``) does not silence the bar with it.

    >>> with terminal_bar(total=3, desc="convify: work") as bar:
    ...     for _ in range(3):
    ...         if bar is not None:
    ...             bar.update(1)
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm.auto import tqdm  # noqa: PLC0415  (only on a terminal)

    with _own_stderr() as stream:
        bar = tqdm(file=stream, leave=False, dynamic_ncols=True, **options)
        try:
            yield bar
        finally:
            bar.close()


@contextlib.contextmanager
def _own_stderr() -> Iterator[TextIO]:
    """A stream on a duplicate of stderr's descriptor (stderr itself when it has none, as in tests)."""
    try:
        fd = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        yield sys.stderr
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()  # what was said before the bar comes before it
    stream = os.fdopen(fd, "w", encoding=getattr(sys.stderr, "encoding", None) or "utf-8", errors="replace")
    try:
        yield stream
    finally:
        stream.close()
