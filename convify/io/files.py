"""Reading model and weights files without running their code.

``.safetensors`` files give their tensors; ``torch.save`` files are read with
``weights_only=True``. A file that holds Python objects is refused unless the
caller trusts it; TorchScript archives and torch.export programs are refused
with the reason.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from convify.errors import CheckpointError, one_line

LISTED = 8  # names shown per kind in one error line

def _check_input_file(path: Path, what: str = "model file") -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such {what}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a {what}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted save or download?")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _zip_names(path: Path) -> list[str] | None:
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except Exception:  # a damaged directory raises more than BadZipFile: torch.load then says why
        return None


def _refuse_torchscript_or_export(path: Path, names: list[str]) -> None:
    if any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names):
        raise CheckpointError(
            f"{path} is a TorchScript archive: torch.fx cannot trace TorchScript, so convify cannot rewrite it; "
            "rewrite the Python model (or its state_dict with {arch}) before scripting")
    if any("serialized_exported_program" in n or n.endswith("/archive_format") for n in names):
        raise CheckpointError(
            f"{path} is a torch.export program, not a module convify can rewrite; give the Python model's "
            "state_dict with {arch} instead")


#: What MODEL and --weights may be, for the message that refuses another kind of file.
_TAKES = {"model file": "a convify checkpoint, a state_dict (.pt/.pth/.safetensors) with {arch}, a Hugging Face "
                        "model folder, or a pickled nn.Module with {trust_pickle}",
          "weights file": "a state_dict saved with torch.save (.pt/.pth) or a .safetensors file"}

#: Field tags a serialized onnx.ModelProto has after ``ir_version`` (field 1, written first): producer name and
#: version, domain, model version, doc string, graph, opset imports.
_ONNX_SECOND_TAGS = frozenset(b"\x12\x1a\x22\x28\x32\x3a\x42")


def _refuse_foreign_format(path: Path, what: str) -> None:
    """Refuse an ONNX model or a text file before torch reads it as a pickle (which says "Unsupported operand 8"
    or "KeyError: 101"). torch's own formats start with a zip header or a pickle protocol byte."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return
    takes = _TAKES.get(what, _TAKES["model file"])
    if len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _ONNX_SECOND_TAGS:
        raise CheckpointError(f"{path} is an ONNX model, not a PyTorch {what}: convify rewrites PyTorch models "
                              f"before export, so give the model it was exported from: {takes}")
    if _is_text(head):
        kind = "a JSON text file" if head.lstrip()[:1] in (b"{", b"[") else "a text file"
        raise CheckpointError(f"{path} is {kind}, not a PyTorch {what}: convify takes {takes}")


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a character cut at the end of the sample
    return True


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (never runs code)."""
    path = Path(path)
    _check_input_file(path, "weights file")
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                              f"{one_line(e)}") from e


def read_file(path: str | os.PathLike[str], *, trust_pickle: bool = False, what: str = "model file") -> Any:
    """What a model or weights file holds, read without running its code.

    ``.safetensors`` files give their tensors; ``torch.save`` files are read
    with ``weights_only=True``. A file that holds Python objects (a whole
    pickled ``nn.Module``, custom classes) is refused unless
    ``trust_pickle=True``, since unpickling it runs code from the file.
    TorchScript archives are refused: torch.fx cannot trace them.
    """
    path = Path(path)
    _check_input_file(path, what)
    if _is_safetensors(path):
        return read_safetensors(path)
    _refuse_foreign_format(path, what)
    names = _zip_names(path)
    if names is not None:
        _refuse_torchscript_or_export(path, names)
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        foreign = _python_globals(path, names is not None)
        if not foreign:
            raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt?): "
                                  f"{_first_reason(e)}") from e
        if not trust_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects ({listing(foreign)}), not just tensors: loading it runs "
                "code from the file. Pass {trust_pickle} only if you trust its source; "
                "safer, save model.state_dict() and give {arch}") from e
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt?): "
                              f"{_first_reason(e)}") from e
    try:
        return _torch_load(path, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"unpickling {path} failed: {one_line(e)}; the classes it names must be "
                              "importable, as they were when it was saved") from e


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # protocol and TorchScript notices: the caller reports plainly
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _first_reason(e: BaseException) -> str:
    text = str(e)
    for marker in ("PytorchStreamReader failed", "Unsupported operand", "invalid load key"):
        i = text.find(marker)
        if i >= 0:
            return text[i:].splitlines()[0].split(". ")[0][:200]
    return one_line(e)


def _python_globals(path: Path, is_zip: bool) -> list[str]:
    """Names of the Python objects a pickle would import, found without
    unpickling (``pickletools`` only parses opcodes)."""
    if is_zip:
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            return []
    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            # The legacy torch.save format is several pickles in a row (magic
            # number, version, system info, the object), then raw storages.
            for _ in range(5):
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    if isinstance(arg, str):
                        strings.append(arg)
    except Exception:
        pass  # the storages after the last pickle, or a corrupt file: what was found stands
    safe = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")
    return [g for g in dict.fromkeys(found) if not g.startswith(safe) or "nn.modules" in g]


def listing(names: Sequence[str], limit: int = LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


