"""Models the ways users store them, and convify's own checkpoints.

A model comes from an architecture spec plus optional weights
(``torchvision:resnet18``, ``timm:resnet50``, ``package.module:factory``;
a state_dict in ``.pt``/``.pth`` or ``.safetensors``), from a whole pickled
``nn.Module`` (only when the user trusts the file), or from a convify
checkpoint.

A convify checkpoint is a recipe plus weights, readable with
``torch.load(path, weights_only=True)``::

    {"format": "convify", "version": "0.1.0",
     "arch": "torchvision:resnet18", "arch_kwargs": {"num_classes": 10},
     "rewrite": {"pool": "conv", "head": "conv", "init": "avg", "dense": False, "only": None, "skip": None},
     "before": [],                      # earlier rewrites, each with its own "input_shape"
     "input_shape": [1, 3, 224, 224],
     "state_dict": {...}}

:func:`load` rebuilds the architecture, applies the same rewrites on a zero
input of ``input_shape`` and loads the weights with ``strict=True``.

Nothing here unpickles code unless asked to: state_dicts are read with
``weights_only=True``; a file that holds Python objects is refused unless the
caller trusts it, and a recipe that names an import path is refused unless the
caller trusts the code it would run.
"""
from __future__ import annotations

import dataclasses

import ast
import contextlib
import difflib
import importlib
import os
import pickle
import pickletools
import re
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .errors import CheckpointError, ConvifyError

FORMAT = "convify"

#: The options of ``convify.convify`` a recipe records, with their defaults.
REWRITE_DEFAULTS: dict[str, Any] = {
    "pool": "conv", "head": "conv", "init": "avg", "dense": False, "only": None, "skip": None,
}

# Keys under which training scripts nest the state_dict, most specific first.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes added by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LISTED = 8  # keys shown per kind of mismatch in one error line


# --------------------------------------------------------------------------- architecture specs


@dataclass(frozen=True)
class ArchSpec:
    """Where a model's builder comes from.

    >>> parse_arch("torchvision:resnet18")
    ArchSpec(kind='torchvision', name='resnet18')
    >>> parse_arch("mypkg.models:make_net").kind
    'import'
    """

    kind: str  # "torchvision" | "timm" | "import"
    name: str  # builder name, or "package.module:factory" for kind "import"

    def __str__(self) -> str:
        return self.name if self.kind == "import" else f"{self.kind}:{self.name}"

    @property
    def runs_foreign_code(self) -> bool:
        """An import path runs whatever code that module holds."""
        return self.kind == "import"


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def parse_arch(spec: str | ArchSpec) -> ArchSpec:
    """Parse ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``."""
    if isinstance(spec, ArchSpec):
        return spec
    text = spec.strip()
    prefix, sep, name = text.partition(":")
    if sep and prefix in ("torchvision", "timm"):
        if not name:
            raise CheckpointError(f"architecture {spec!r} names no model: write {prefix}:NAME, e.g. "
                                  f"{prefix}:resnet18")
        return ArchSpec(prefix, name)
    if _IMPORT_PATH.match(text):
        return ArchSpec("import", text)
    hint = f" (did you mean torchvision:{text}?)" if not sep and text else ""
    raise CheckpointError(f"cannot read architecture {spec!r}: write torchvision:NAME, timm:NAME or "
                          f"package.module:factory{hint}")


def parse_arch_kwargs(items: Sequence[str] | None) -> dict[str, Any]:
    """``["num_classes=10", "dropout=0.2"]`` -> ``{"num_classes": 10, "dropout": 0.2}``.

    Each value is read as a Python literal (``ast.literal_eval``); strings need
    quotes (``"variant='small'"``).
    """
    kwargs: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise CheckpointError(f"cannot read --arch-kwargs {item!r}: write key=value, e.g. num_classes=10")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise CheckpointError(
                f"cannot read the value of --arch-kwargs {item!r}: it must be a Python literal "
                f"(10, 0.5, True, None, 'text' with quotes, [1, 2])"
            ) from e
    return kwargs


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    if not isinstance(text, str):
        parts: Sequence[Any] = list(text)
    else:
        body = text.strip().strip("()[]")
        parts = [p.strip() for p in body.split("," if "," in body else "x")]
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"malformed input shape {text!r}: write N,C,H,W with whole numbers, "
                              "e.g. 1,3,224,224") from e
    if len(shape) < 3 or any(d <= 0 for d in shape):
        raise CheckpointError(f"malformed input shape {text!r}: give batch, channels and at least one "
                              "spatial size, all positive, e.g. 1,3,224,224")
    return shape


def build_arch(spec: str | ArchSpec, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the (untrained) model a spec names, in eval mode.

    >>> build_arch("torchvision:resnet18", {"num_classes": 10})
    """
    arch = parse_arch(spec)
    kwargs = dict(kwargs or {})
    builder = {"torchvision": _torchvision_builder, "timm": _timm_builder, "import": _import_builder}[arch.kind]
    make = builder(arch.name, kwargs)
    try:
        model = make()
    except ConvifyError:
        raise
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise CheckpointError(f"building {arch}({shown}) failed: {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{arch} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _torchvision_builder(name: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    import torchvision  # noqa: PLC0415  (only for torchvision specs)

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise CheckpointError(f"unknown torchvision architecture {name!r}{hint}")
    return lambda: torchvision.models.get_model(name, **kwargs)


def _timm_builder(name: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    try:
        import timm  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise CheckpointError(f"timm:{name} needs timm: pip install timm") from e
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise CheckpointError(f"unknown timm architecture {name!r}{hint}")
    kwargs.setdefault("pretrained", False)  # never download weights behind the user's back
    return lambda: timm.create_model(name, **kwargs)


def _import_builder(path: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    module_name, _, attr = path.partition(":")
    with _cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise CheckpointError(f"cannot import {module_name!r} for architecture {path!r}: {_one_line(e)}; "
                                  "is it installed or in the current folder?") from e
        except Exception as e:
            raise CheckpointError(f"importing {module_name!r} for architecture {path!r} failed: "
                                  f"{_one_line(e)}") from e
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise CheckpointError(f"module {module_name!r} has no attribute {attr!r} (architecture {path!r})")
    if not callable(factory):
        raise CheckpointError(f"{path} is a {type(factory).__name__}, not a callable that builds a model")
    return lambda: factory(**kwargs)


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Import paths resolve against the current folder too, like ``module:app``
    for ASGI servers, whether convify runs as a console script or not."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# --------------------------------------------------------------------------- reading files


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
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _refuse_torchscript_or_export(path: Path, names: list[str]) -> None:
    if any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names):
        raise CheckpointError(
            f"{path} is a TorchScript archive: torch.fx cannot trace TorchScript, so convify cannot rewrite it; "
            "rewrite the Python model (or its state_dict with --arch) before scripting")
    if any("serialized_exported_program" in n or n.endswith("/archive_format") for n in names):
        raise CheckpointError(
            f"{path} is a torch.export program, not a module convify can rewrite; give the Python model's "
            "state_dict with --arch instead")


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (never runs code)."""
    path = Path(path)
    _check_input_file(path, "weights file")
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                              f"{_one_line(e)}") from e


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
                f"{path} holds pickled Python objects ({_listing(foreign)}), not just tensors: loading it runs "
                "code from the file. Pass --trust-pickle (trust_pickle=True) only if you trust its source; "
                "safer, save model.state_dict() and give --arch") from e
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt?): "
                              f"{_first_reason(e)}") from e
    try:
        return _torch_load(path, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"unpickling {path} failed: {_one_line(e)}; the classes it names must be "
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
    return _one_line(e)


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


def _listing(names: Sequence[str], limit: int = _LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- state dicts


def _is_tensor_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in obj.items())


def unwrap(obj: Any, path: str | os.PathLike[str] = "<object>") -> dict[str, torch.Tensor] | nn.Module:
    """The state_dict (or module) inside what ``torch.load`` returned:
    ``{"state_dict": ...}``, ``{"model": ...}`` and the like are opened, the
    ``module.`` prefix of DataParallel/DDP and ``_orig_mod.`` of torch.compile
    are removed.

    >>> unwrap({"epoch": 3, "state_dict": {"module.fc.weight": w}})
    {'fc.weight': w}
    """
    for _ in range(4):  # wrappers nest a few levels at most
        if isinstance(obj, nn.Module) or _is_tensor_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict or a model")
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
        if inner is None:
            keys = [str(k) for k in list(obj)[:_LISTED]]
            raise CheckpointError(f"{path} holds a dict with keys {keys} and no state_dict in it "
                                  f"(looked under {', '.join(_WRAPPER_KEYS)} and for a dict of tensors)")
        obj = inner
    if isinstance(obj, torch.jit.ScriptModule):
        raise CheckpointError(f"{path} holds a TorchScript module: torch.fx cannot trace it")
    if isinstance(obj, nn.Module):
        return obj
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{path} holds no state_dict (a dict of tensors) nor a model")
    return strip_prefixes(dict(obj))


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove ``module.`` / ``_orig_mod.`` where every key has it."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


@dataclass(frozen=True)
class KeyMismatch:
    """How a state_dict differs from the one a model expects."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # key, in file, in model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_listing(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_listing(self.unexpected)})")
        if self.shapes:
            shown = [f"{k} {list(a)} in file vs {list(b)} in model" for k, a, b in self.shapes]
            parts.append(f"{len(self.shapes)} of another shape ({_listing(shown, 4)})")
        return "; ".join(parts)


def compare_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> KeyMismatch:
    """Missing, unexpected and differently shaped keys of ``state_dict`` for ``model``.

    A missing ``num_batches_tracked`` (older checkpoints lack it) is not counted.
    """
    expected = model.state_dict()
    missing = tuple(k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = tuple(k for k in state_dict if k not in expected)
    shapes = tuple(
        (k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and isinstance(expected[k], torch.Tensor)
        and tuple(v.shape) != tuple(expected[k].shape))
    return KeyMismatch(missing, unexpected, shapes)


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], *, source: str, target: str) -> None:
    """Load ``state_dict`` into ``model``, or raise listing every mismatch.

    When every key carries one extra leading component (Lightning's ``model.``)
    and dropping it makes the keys fit, it is dropped.
    """
    mismatch = compare_keys(model, state_dict)
    if mismatch:
        stripped = _strip_common_component(state_dict)
        if stripped is not None and not compare_keys(model, stripped):
            state_dict, mismatch = stripped, KeyMismatch()
    if mismatch:
        hint = " (other builder arguments? see --arch-kwargs)" if mismatch.shapes else ""
        raise CheckpointError(f"the weights in {source} do not fit {target}: {mismatch.describe()}{hint}")
    try:
        model.load_state_dict(dict(state_dict), strict=False)
    except Exception as e:
        raise CheckpointError(f"loading the weights in {source} into {target} failed: {_one_line(e)}") from e


def _strip_common_component(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    firsts = {k.split(".", 1)[0] for k in state_dict}
    if len(firsts) != 1 or not all("." in k for k in state_dict):
        return None
    return {k.split(".", 1)[1]: v for k, v in state_dict.items()}


# --------------------------------------------------------------------------- rewriting by recipe


def rewrite_options(**options: Any) -> dict[str, Any]:
    """The full, normalized rewrite options of a recipe (defaults filled in,
    ``"none"`` read as None, patterns as lists)."""
    unknown = set(options) - set(REWRITE_DEFAULTS)
    if unknown:
        raise CheckpointError(f"unknown rewrite options {sorted(unknown)}; known: {sorted(REWRITE_DEFAULTS)}")
    opts = {**REWRITE_DEFAULTS, **options}
    for key in ("pool", "head"):
        if opts[key] == "none":
            opts[key] = None
    for key in ("only", "skip"):
        value = opts[key]
        if isinstance(value, str):
            opts[key] = [value]
        elif value is not None:
            opts[key] = [str(v) for v in value]
    opts["dense"] = bool(opts["dense"])
    return opts


def example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Zeros of ``input_shape`` in the model's floating dtype and device."""
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    return torch.zeros(tuple(input_shape), dtype=dtype, device=device)


def apply_rewrite(model: nn.Module, options: Mapping[str, Any], input_shape: Sequence[int],
                  calibration: Any = None) -> nn.Module:
    """``convify.convify`` with a recipe's options, on zeros of ``input_shape``.

    The one code path shared by ``convify rewrite`` and :func:`load`, so that
    a checkpoint rebuilds exactly the modules it was saved from. A recipe made
    with ``init="fit"`` rebuilds with ``init="avg"`` when no ``calibration``
    is given: the same modules, whose fitted weights are then loaded.
    """
    from . import api  # noqa: PLC0415  (the rewrite machinery; not needed to parse or refuse)

    opts = rewrite_options(**options)
    x = example_input(model, input_shape)
    init = opts["init"]
    rebuild_fit = init == "fit" and calibration is None
    result = api.convify(model, x, pool=opts["pool"], head=opts["head"], init="avg" if rebuild_fit else init,
                         dense=opts["dense"], only=opts["only"], skip=opts["skip"],
                         calibration=None if rebuild_fit else calibration)
    if rebuild_fit:  # the report tells how the weights were made, not how the modules were rebuilt
        from .report import Report, attach, report  # noqa: PLC0415

        earlier = len(report(model).passes)
        passes = report(result).passes
        added = tuple(dataclasses.replace(p, options={**p.options, "init": "fit"},
                                          notes=p.notes + ("fitted weights come from the checkpoint",))
                      if p.rewrite == "maxpool" else p for p in passes[earlier:])
        attach(result, Report(passes[:earlier] + added))
    return result


# --------------------------------------------------------------------------- writing


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
        raise CheckpointError(f"{out} exists: pass --force (force=True) to replace it")
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
            raise CheckpointError(f"{out} exists: pass --force (force=True) to replace it")
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


def _plain(value: Any, where: str) -> Any:
    """Recipe values must load under ``weights_only=True``: literals only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise CheckpointError(f"{where} holds a {type(value).__name__}; a checkpoint recipe stores only literals "
                          "(numbers, strings, booleans, None, lists, dicts)")


def make_recipe(*, arch: str | ArchSpec, input_shape: Sequence[int], arch_kwargs: Mapping[str, Any] | None = None,
                rewrite: Mapping[str, Any] | None = None, before: Sequence[Mapping[str, Any]] = ()
                ) -> dict[str, Any]:
    """The recipe part of a checkpoint (everything but the state_dict)."""
    from . import __version__  # noqa: PLC0415

    before_list = []
    for i, step in enumerate(before):
        step = dict(step)
        shape = list(parse_input_shape(step.pop("input_shape", input_shape)))
        before_list.append({**rewrite_options(**step), "input_shape": shape})
    return {
        "format": FORMAT,
        "version": __version__,
        "arch": str(parse_arch(arch)),
        "arch_kwargs": _plain(dict(arch_kwargs or {}), "arch_kwargs"),
        "rewrite": _plain(rewrite_options(**(rewrite or {})), "rewrite"),
        "before": _plain(before_list, "before"),
        "input_shape": list(parse_input_shape(input_shape)),
    }


def save(model: nn.Module, path: str | os.PathLike[str], *, arch: str | ArchSpec, input_shape: Sequence[int],
         arch_kwargs: Mapping[str, Any] | None = None, rewrite: Mapping[str, Any] | None = None,
         before: Sequence[Mapping[str, Any]] = (), force: bool = False, check: bool = True) -> Path:
    """Write a rewritten model as a convify checkpoint (recipe plus state_dict).

    ``arch``, ``arch_kwargs``, ``rewrite`` (the keyword arguments given to
    ``convify.convify``; defaults filled in) and ``input_shape`` (the example
    input's shape) must be those the model was made with: :func:`load`
    rebuilds it from them. ``check=True`` rebuilds it once now and refuses to
    write a recipe that does not give back this model's state_dict.

    >>> m = torchvision.models.resnet18(num_classes=10).eval()
    >>> x = torch.randn(1, 3, 224, 224)
    >>> allconv = convify.convify(m, x)
    >>> convify.save(allconv, "resnet18_allconv.pt", arch="torchvision:resnet18",
    ...              arch_kwargs={"num_classes": 10}, input_shape=x.shape)
    """
    recipe = make_recipe(arch=arch, input_shape=input_shape, arch_kwargs=arch_kwargs, rewrite=rewrite, before=before)
    checkpoint = to_checkpoint(model, recipe)
    if check:
        rebuilt = rebuild(recipe, source=str(path), trust_code=True)
        mismatch = compare_keys(rebuilt, checkpoint["state_dict"])
        if mismatch:
            raise CheckpointError(f"the recipe for {path} does not rebuild this model ({mismatch.describe()}); "
                                  "pass the arch, arch_kwargs, rewrite options and input_shape it was made with")
    return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), force=force)


def to_checkpoint(model: nn.Module, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe from :func:`make_recipe` plus the model's weights (on the CPU)."""
    return {**recipe, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_pickled(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Write a whole pickled module (``torch.save(model)``), for models no
    recipe can rebuild; loading it back needs the same trust as its source."""
    return atomic_write(path, lambda tmp: torch.save(model, tmp), force=force, inputs=inputs)


# --------------------------------------------------------------------------- loading


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def rebuild(recipe: Mapping[str, Any], *, source: str = "<recipe>", trust_code: bool = False) -> nn.Module:
    """Build the architecture a recipe names and apply its rewrites (weights
    not loaded). An import-path architecture needs ``trust_code=True``."""
    try:
        arch = parse_arch(recipe["arch"])
        arch_kwargs = dict(recipe.get("arch_kwargs") or {})
        rewrite = dict(recipe.get("rewrite") or {})
        before = [dict(step) for step in recipe.get("before") or ()]
        input_shape = parse_input_shape(recipe["input_shape"])
    except (KeyError, TypeError, ValueError, CheckpointError) as e:
        raise CheckpointError(f"{source} is a convify checkpoint with a damaged recipe: {_one_line(e)}") from e
    if arch.runs_foreign_code and not trust_code:
        raise CheckpointError(
            f"{source} builds its model by calling {arch}, code chosen by whoever wrote the file; "
            "pass --trust-code (trust_code=True) only if you trust that code")
    model = build_arch(arch, arch_kwargs)
    for step in before:
        shape = parse_input_shape(step.pop("input_shape", input_shape))
        model = apply_rewrite(model, step, shape)
    return apply_rewrite(model, rewrite, input_shape).eval()


def load(path: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Rebuild a rewritten model from a convify checkpoint, in eval mode.

    The architecture is built from the recipe, the same rewrites are applied,
    and the saved weights are loaded with ``strict=True``. A recipe whose
    architecture is an import path (``package.module:factory``) would run
    code chosen by the file's author: it is refused unless ``trust_code=True``.

    >>> allconv = convify.load("resnet18_allconv.pt")
    >>> allconv(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 10])
    """
    obj = read_file(path, what="checkpoint")
    if not is_checkpoint(obj):
        raise CheckpointError(f"{path} is not a convify checkpoint (written by `convify rewrite` or convify.save); "
                              "for a plain state_dict build the model and call load_state_dict")
    return load_checkpoint(obj, source=str(path), trust_code=trust_code)


def load_checkpoint(obj: Mapping[str, Any], *, source: str, trust_code: bool = False) -> nn.Module:
    """:func:`load` for a checkpoint dict already read from ``source``."""
    model = rebuild(obj, source=source, trust_code=trust_code)
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source} is a convify checkpoint without a state_dict")
    mismatch = compare_keys(model, state_dict)
    if mismatch:
        raise CheckpointError(f"the weights in {source} do not fit the model its recipe rebuilds "
                              f"({mismatch.describe()}); was it written by another convify version?")
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except Exception as e:
        raise CheckpointError(f"loading the weights in {source} failed: {_one_line(e)}") from e
    return model.eval()


# --------------------------------------------------------------------------- a model from what the user gave


@dataclass
class ModelSource:
    """A model as the user gave it, with what a recipe needs to rebuild it."""

    model: nn.Module
    label: str                            # for messages: "torchvision:resnet18 + w.pt"
    arch: ArchSpec | None = None          # None: a pickled module, no recipe possible
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None    # from a convify checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)  # rewrites already applied (with shapes)
    files: tuple[Path, ...] = ()          # files read (never written over)

    @property
    def pickled(self) -> bool:
        return self.arch is None


def open_model(path: str | os.PathLike[str] | None = None, *, arch: str | None = None,
               arch_kwargs: Mapping[str, Any] | None = None, weights: str | os.PathLike[str] | None = None,
               trust_pickle: bool = False, trust_code: bool = False) -> ModelSource:
    """The model a user names: a file (convify checkpoint, or a pickled
    module with ``trust_pickle``), or ``arch`` with optional ``weights``
    (``path`` given together with ``arch`` is read as the weights).

    >>> open_model(arch="torchvision:resnet18", weights="resnet18.pth").model
    """
    if path is not None and weights is not None:
        raise CheckpointError("give the weights once: either as MODEL or with --weights, not both")
    if arch is not None:
        return _open_arch(arch, dict(arch_kwargs or {}), weights if weights is not None else path,
                          trust_pickle=trust_pickle)
    if weights is not None:
        raise CheckpointError("--weights needs --arch: say which architecture the weights belong to")
    if arch_kwargs:
        raise CheckpointError("--arch-kwargs needs --arch")
    if path is None:
        raise CheckpointError("no model given: name a MODEL file or an architecture with --arch")
    return _open_file(Path(path), trust_pickle=trust_pickle, trust_code=trust_code)


def _open_arch(arch: str, arch_kwargs: dict[str, Any], weights: str | os.PathLike[str] | None, *,
               trust_pickle: bool) -> ModelSource:
    spec = parse_arch(arch)
    files: tuple[Path, ...] = ()
    state_dict = None
    if weights is not None:
        wpath = Path(weights)
        files = (wpath,)
        content = read_file(wpath, trust_pickle=trust_pickle, what="weights file")
        if is_checkpoint(content):
            raise CheckpointError(f"{wpath} is a convify checkpoint: it names its own architecture, so give it "
                                  "as MODEL without --arch")
        content = unwrap(content, wpath)
        state_dict = content.state_dict() if isinstance(content, nn.Module) else content
    model = build_arch(spec, arch_kwargs)
    label = str(spec)
    if state_dict is not None:
        load_weights(model, state_dict, source=str(weights), target=str(spec))
        label += f" + {weights}"
    return ModelSource(model.eval(), label, spec, arch_kwargs, files=files)


def _open_file(path: Path, *, trust_pickle: bool, trust_code: bool) -> ModelSource:
    content = read_file(path, trust_pickle=trust_pickle)
    if is_checkpoint(content):
        model = load_checkpoint(content, source=str(path), trust_code=trust_code)
        shape = tuple(content["input_shape"])
        history = [{**dict(step)} for step in content.get("before") or ()]
        history.append({**dict(content["rewrite"]), "input_shape": list(shape)})
        return ModelSource(model, str(path), parse_arch(content["arch"]), dict(content.get("arch_kwargs") or {}),
                           shape, history, (path,))
    content = unwrap(content, path)
    if isinstance(content, nn.Module):
        return ModelSource(content.eval(), str(path), files=(path,))
    raise CheckpointError(f"{path} holds a state_dict ({len(content)} tensors) but no architecture: say which "
                          "with --arch torchvision:NAME, timm:NAME or package.module:factory")
