"""Architecture specs: which builder makes the model a user names.

``torchvision:NAME``, ``timm:NAME``, ``hf:CLASS`` or ``package.module:factory``,
with builder keyword arguments given as ``key=value`` literals.

``hf:CLASS`` is a Hugging Face ``transformers`` model class built from its
configuration, given whole as ``arch_kwargs={"config": {...}}`` (the literals
of ``config.json``): a checkpoint's recipe stays self-contained and rebuilds
without the folder the model came from. ``hf:DIR`` builds from the
``config.json`` in a folder. Neither runs code from outside ``transformers``:
the class must be one of its own, and ``trust_remote_code`` stays False.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch.nn as nn

from convify.errors import CheckpointError, ConvifyError, one_line


@dataclass(frozen=True)
class ArchSpec:
    """Where a model's builder comes from.

    >>> parse_arch("torchvision:resnet18")
    ArchSpec(kind='torchvision', name='resnet18')
    >>> parse_arch("mypkg.models:make_net").kind
    'import'
    """

    kind: str  # "torchvision" | "timm" | "hf" | "import"
    name: str  # builder name, "package.module:factory" for kind "import", a class or folder for "hf"

    def __str__(self) -> str:
        return self.name if self.kind == "import" else f"{self.kind}:{self.name}"

    @property
    def runs_foreign_code(self) -> bool:
        """An import path runs whatever code that module holds."""
        return self.kind == "import"


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def parse_arch(spec: str | ArchSpec) -> ArchSpec:
    """Parse ``torchvision:NAME``, ``timm:NAME``, ``hf:CLASS`` or ``package.module:factory``."""
    if isinstance(spec, ArchSpec):
        return spec
    text = spec.strip()
    prefix, sep, name = text.partition(":")
    if sep and prefix in ("torchvision", "timm", "hf"):
        if not name:
            example = "ResNetForImageClassification" if prefix == "hf" else "resnet18"
            raise CheckpointError(f"architecture {spec!r} names no model: write {prefix}:NAME, e.g. "
                                  f"{prefix}:{example}")
        return ArchSpec(prefix, name)
    if _IMPORT_PATH.match(text):
        return ArchSpec("import", text)
    hint = f" (did you mean torchvision:{text}?)" if not sep and text else ""
    raise CheckpointError(f"cannot read architecture {spec!r}: write torchvision:NAME, timm:NAME, hf:CLASS or "
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
            raise CheckpointError(f"cannot read {{arch_kwargs}} item {item!r}: write key=value, e.g. num_classes=10")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise CheckpointError(
                f"cannot read the value of {{arch_kwargs}} item {item!r}: it must be a Python literal "
                f"(10, 0.5, True, None, 'text' with quotes, [1, 2])"
            ) from e
    return kwargs


def build_arch(spec: str | ArchSpec, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the (untrained) model a spec names, in eval mode.

    >>> build_arch("torchvision:resnet18", {"num_classes": 10})
    """
    arch = parse_arch(spec)
    kwargs = dict(kwargs or {})
    builder = {"torchvision": _torchvision_builder, "timm": _timm_builder, "hf": _hf_builder,
               "import": _import_builder}[arch.kind]
    make = builder(arch.name, kwargs)
    try:
        model = make()
    except ConvifyError:
        raise
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise CheckpointError(f"building {arch}({shown}) failed: {one_line(e)}") from e
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


HF_EXTRA = "pip install -e '.[hf]' (or pip install transformers)"


def transformers_module(why: str) -> Any:
    """``transformers``, an optional dependency, or a clear error saying how to get it."""
    try:
        import transformers  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise CheckpointError(f"{why} needs Hugging Face transformers: {HF_EXTRA}") from e
    return transformers


def hf_class(name: str) -> type[nn.Module]:
    """The ``transformers`` model class called ``name`` (its own classes only)."""
    transformers = transformers_module(f"hf:{name}")
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"hf:{name}: transformers has no model class {name!r} (e.g. "
                              "ResNetForImageClassification); a folder saved with save_pretrained is given "
                              "as the model itself")
    return cls


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A transformers configuration as the literals of its ``config.json``."""
    return json.loads(config.to_json_string(use_diff=False))


def _hf_builder(name: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    """``hf:CLASS`` with ``config={...}``, or ``hf:DIR`` (its config.json): an untrained model."""
    if os.path.isdir(name):
        transformers = transformers_module(f"hf:{name}")
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
        return lambda: transformers.AutoModelForImageClassification.from_config(config)
    cls = hf_class(name)
    unknown = sorted(set(kwargs) - {"config"})
    if unknown or not isinstance(kwargs.get("config"), Mapping):
        raise CheckpointError(f"hf:{name} is built from its configuration: give arch_kwargs={{'config': {{...}}}} "
                              f"(the contents of config.json){f', not {unknown}' if unknown else ''}")
    config = cls.config_class.from_dict(dict(kwargs["config"]))
    return lambda: cls(config)


def _import_builder(path: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    module_name, _, attr = path.partition(":")
    with _cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise CheckpointError(f"cannot import {module_name!r} for architecture {path!r}: {one_line(e)}; "
                                  "is it installed or in the current folder?") from e
        except Exception as e:
            raise CheckpointError(f"importing {module_name!r} for architecture {path!r} failed: "
                                  f"{one_line(e)}") from e
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


