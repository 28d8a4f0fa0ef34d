"""Running an ONNX exporter quietly: its progress prints (Python and C++ alike) sent to nowhere,
its warnings kept for the export's result, its loggers at ERROR; only exceptions get through."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Any, Iterator


def run_quietly(fn: Any, *args: Any, verbose: bool) -> tuple[str, ...]:
    """Run one exporter; unless ``verbose``, swallow its progress prints (Python
    and C++ alike) and warnings (kept in the result); only exceptions get through."""
    if verbose:
        fn(*args)
        return ()
    with warnings.catch_warnings(record=True) as caught, silenced_output(), quiet_loggers():
        warnings.simplefilter("always")
        fn(*args)
    return tuple(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if str(w.message)))


@contextlib.contextmanager
def silenced_output() -> Iterator[None]:
    """Send stdout and stderr to nowhere at the file-descriptor level: the
    legacy exporter prints its TorchScript graph from C++ when it fails."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # no real descriptors (an embedding host): Python-level only
            yield
            return
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, devnull):
                os.close(fd)


@contextlib.contextmanager
def quiet_loggers() -> Iterator[None]:
    """Raise the exporters' loggers to ERROR for the duration."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
             "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
