"""How the command line talks: reports on stdout, notes on stderr (so that
``--json`` output can be piped), progress only on a terminal."""
from __future__ import annotations

import contextlib
import itertools
import json
import sys
import threading
from typing import Any, Iterator, Sequence


def note(text: str) -> None:
    print(f"convify: {text}", file=sys.stderr)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def shape_text(shape: Sequence[int]) -> str:
    """``(1, 3, 224, 224)`` as ``1x3x224x224``."""
    return "x".join(str(d) for d in shape)


class Progress:
    """Step-by-step progress on stderr, shown only on a terminal: the step, a spinner and the elapsed time,
    redrawn a few times a second so that a long step (an export, onnxruntime) is seen to be alive."""

    TICK = 0.25  # seconds between redraws

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None
        self._stack = contextlib.ExitStack()
        self._desc = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self) -> "Progress":
        from convify.progress import terminal_bar  # noqa: PLC0415  (the CLI imports lazily: `convify --help` is fast)

        self.bar = self._stack.enter_context(
            terminal_bar(total=self.total, bar_format="convify: {desc} [{n_fmt}/{total_fmt}] {elapsed}"))
        if self.bar is not None:
            ticker = threading.Thread(target=self._tick, name="convify-progress", daemon=True)
            ticker.start()
            self._stack.callback(ticker.join)
            self._stack.callback(self._stop.set)  # callbacks run last in, first out: stop, then join
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _tick(self) -> None:
        for frame in itertools.cycle("|/-\\"):
            if self._stop.wait(self.TICK):
                return
            with self._lock:
                self.bar.set_description_str(f"{self._desc} {frame}")

    def set(self, desc: str) -> None:
        if self.bar is not None:
            with self._lock:
                self._desc = desc
                self.bar.set_description_str(desc)

    @contextlib.contextmanager
    def step(self, desc: str) -> Iterator[None]:
        self.set(desc)
        yield
        if self.bar is not None:
            with self._lock:
                self.bar.update()
