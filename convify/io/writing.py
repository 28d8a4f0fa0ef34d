"""Writing files safely: never over an input, never a partial file, never
over an existing file unless asked.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from convify.errors import CheckpointError
from convify.fx.portable import portable


def check_output(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Refuse an output path before any work is done: one of the inputs, an
    existing file without ``force``, a folder, or a folder that cannot be written."""
    out = Path(path)
    for given in inputs:
        if given is not None and _same_file(out, Path(given)):
            raise CheckpointError(f"refusing to write over the input {given}: choose another output path")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder: give a file path for the output")
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists: pass {{force}} to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise CheckpointError(f"cannot write {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: folder {parent} is not writable")
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into
    place: an interrupted or failed write leaves no partial file and the old
    ``path`` intact."""
    out = check_output(path, force=force, inputs=inputs)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _file_mode(out))  # mkstemp makes 0600; the user expects their usual mode
        write(tmp)
        if out.exists() and not force:  # appeared while we worked
            raise CheckpointError(f"{out} exists: pass {{force}} to replace it")
        os.replace(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from e
        raise
    return out


def _file_mode(out: Path) -> int:
    if out.exists():
        return out.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_pickled(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Write a whole pickled module (``torch.save(model)``), for models no
    recipe can rebuild; loading it back needs the same trust as its source,
    and convify only where :func:`convify.fx.portable.convify_names` names
    something (its guards are written as plain torch: :func:`~convify.fx.portable.portable`)."""
    payload = portable(model)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), force=force, inputs=inputs)


