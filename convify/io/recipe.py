"""convify checkpoints: a recipe plus weights, readable with
``torch.load(path, weights_only=True)``::

    {"format": "convify", "version": "0.2.0",
     "arch": "torchvision:resnet18", "arch_kwargs": {"num_classes": 10},
     "passes": [{"rewrite": "maxpool", "options": {"mode": "conv", "init": "avg"},
                 "only": None, "skip": None, "input_shape": [1, 3, 224, 224]},
                {"rewrite": "head", "options": {"mode": "conv", "dense": False},
                 "only": None, "skip": None, "input_shape": [1, 3, 224, 224]}],
     "input_shape": [1, 3, 224, 224],          # the example input of the last pass
     "digest": {"algorithm": "sha256", "value": "3f1c...e0"},   # of the state_dict
     "state_dict": {...}}

The passes are the rewrites as the model's report recorded them, each with
the options its rewrite declares (``convify.core.rewrites``): a rewrite added to
the registry is saved and rebuilt with no change here. :func:`load` builds
the architecture, applies the passes on zero inputs of their shapes and loads
the weights with ``strict=True``. Checkpoints written by convify 0.1.0 (one
``"rewrite"`` dict of ``convify.convify`` keywords plus earlier ``"before"``
steps) are read as the same passes.

The digest (``convify.io.digest``) is checked before anything is built: a
file whose weights were damaged is refused, never loaded. 0.1.0 checkpoints
carry none and are not checked.

Nothing here unpickles code unless asked to; a recipe that names an import
path is refused unless the caller trusts the code it would run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from convify.core import registry
from convify.core.report import report
from convify.core.rewrites.head import HeadOptions
from convify.errors import CheckpointError, ConvifyError, UsageError, one_line
from convify.fx.inputs import parse_input_shape, zeros_like_model
from convify.io.arch import ArchSpec, build_arch, parse_arch
from convify.io.digest import check_digest, weights_digest
from convify.io.files import read_file
from convify.io.state import compare_keys
from convify.io.writing import atomic_write

FORMAT = "convify"
#: The recipe layout this version writes (``passes``); 0.1.0's is still read.
RECIPE_VERSION = "0.2.0"


@dataclass(frozen=True)
class RecipePass:
    """One rewrite of a recipe: which, with which options, traced at which
    input shape, over which sites."""

    rewrite: str
    options: Any  # the rewrite's RewriteOptions
    input_shape: tuple[int, ...]
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rewrite": self.rewrite, "options": _plain(self.options.to_dict(), f"{self.rewrite} options"),
                "only": list(self.only) if self.only is not None else None,
                "skip": list(self.skip) if self.skip is not None else None,
                "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RecipePass":
        name = data["rewrite"]
        if name not in registry.REGISTRY:
            raise CheckpointError(f"the recipe names a rewrite {name!r} this convify does not have "
                                  f"(known: {', '.join(sorted(registry.REGISTRY))}); was it written by a newer "
                                  "version?")
        return cls(name, registry.get(name).Options.from_dict(dict(data.get("options") or {})),
                   parse_input_shape(data["input_shape"]), _patterns(data.get("only")), _patterns(data.get("skip")))


def _patterns(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


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


# --------------------------------------------------------------------------- passes


def plan_passes(keywords: Mapping[str, Any], input_shape: Sequence[int], *,
                only: str | Sequence[str] | None = None, skip: str | Sequence[str] | None = None
                ) -> list[RecipePass]:
    """The passes ``convify.convify(model, x, **keywords)`` applies, at ``x``'s shape.

    >>> [p.rewrite for p in plan_passes({"pool": "fold", "head": None}, (1, 3, 32, 32))]
    ['maxpool']
    """
    unknown = registry.unknown_keywords(keywords)
    if unknown:
        raise UsageError(f"unknown rewrite options {unknown}; the rewrites take {registry.all_keywords()}")
    shape = parse_input_shape(input_shape)
    return [RecipePass(spec.name, opts, shape, _patterns(only), _patterns(skip)) for spec in registry.in_order()
            if (opts := spec.options_from_keywords(keywords)) is not None]


def passes_of(model: nn.Module) -> list[RecipePass]:
    """The passes a rewritten model's report records, as recipe passes.

    Raises :class:`CheckpointError` for a pass that traced more than one
    input tensor (a recipe rebuilds from one input shape).
    """
    passes = []
    for p in report(model).passes:
        if p.input_shape is None:
            raise CheckpointError(f"the {p.rewrite} pass of this model traced several input tensors; a convify "
                                  "checkpoint rebuilds from one input shape: save the whole module instead")
        passes.append(RecipePass(p.rewrite, registry.get(p.rewrite).Options.from_dict(p.options), p.input_shape,
                                 p.only, p.skip))
    return passes


def apply_passes(model: nn.Module, passes: Sequence[RecipePass], *,
                 calibration: Iterable[Any] | None = None) -> nn.Module:
    """Apply recipe passes in order to a copy of ``model``, each on zeros of
    its input shape: the one code path shared by ``convify rewrite`` and
    :func:`load`, so that a checkpoint rebuilds exactly the modules it was
    saved from. Without ``calibration``, options that need data (``init="fit"``)
    rebuild the same modules with :meth:`~RewriteOptions.for_rebuild`, whose
    weights are then loaded; the report still records the options as saved.
    """
    from convify.fx.rewrites import implementation  # noqa: PLC0415  (the rewrite machinery: not needed to parse
    from convify.passes import Step, apply_steps  # noqa: PLC0415    or to refuse a recipe)

    steps = []
    for p in passes:
        options, rebuilt_from = p.options, None
        if calibration is None and options.needs_calibration():
            options, rebuilt_from = options.for_rebuild(), options
        steps.append(Step(implementation(p.rewrite)(options), (zeros_like_model(model, p.input_shape),), p.only, p.skip,
                          rebuilt_from))
    return apply_steps(model, steps, calibration)


def rebuild_dense(model: nn.Module, arch: str | ArchSpec, arch_kwargs: Mapping[str, Any] | None = None
                  ) -> nn.Module | None:
    """``model``, a rewrite of ``arch`` whose Linear head was converted without
    ``dense``, rebuilt with its head passes dense and its weights loaded: what
    ``replace_linear_head(..., dense=True)`` would have made of the original
    (a converted head keeps the convolutions it has; only what pins the input
    size goes). A model whose head was never converted comes back as None:
    ``replace_linear_head`` converts it as it is.

    >>> dense = rebuild_dense(convify.load("allconv.pt"), "torchvision:resnet18", {"num_classes": 10})
    """
    passes = passes_of(model)
    if not any(isinstance(p.options, HeadOptions) for p in passes):
        return None
    dense = [dataclasses.replace(p, options=dataclasses.replace(p.options, dense=True))
             if isinstance(p.options, HeadOptions) else p for p in passes]
    rebuilt = apply_passes(build_arch(arch, arch_kwargs), dense).eval()
    state_dict = model.state_dict()
    mismatch = compare_keys(rebuilt, state_dict)
    if mismatch:
        raise CheckpointError(f"the head of this {arch} model does not rebuild dense with the same weights "
                              f"({mismatch.describe()}); rewrite the original with dense")
    rebuilt.load_state_dict(state_dict, strict=True)
    return rebuilt


def _legacy_passes(recipe: Mapping[str, Any]) -> list[RecipePass]:
    """0.1.0 recipes: ``before`` steps and one ``rewrite`` step, each a dict
    of ``convify.convify`` keywords (``pool``, ``head``, ``init``, ``dense``,
    ``only``, ``skip``) with its own ``input_shape``."""
    shape = recipe["input_shape"]
    passes = []
    for step in [*(recipe.get("before") or ()), recipe.get("rewrite") or {}]:
        step = dict(step)
        step_shape = step.pop("input_shape", shape)
        only, skip = step.pop("only", None), step.pop("skip", None)
        keywords = {k: (None if v == "none" else v) for k, v in step.items()}
        keywords.setdefault("pool", "conv")
        keywords.setdefault("head", "conv")
        passes += plan_passes(keywords, step_shape, only=only, skip=skip)
    return passes


def recipe_passes(recipe: Mapping[str, Any], source: str = "<recipe>") -> list[RecipePass]:
    """The passes of a recipe, in either layout."""
    try:
        if "passes" in recipe:
            return [RecipePass.from_dict(p) for p in recipe["passes"]]
        return _legacy_passes(recipe)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, ConvifyError) as e:
        raise CheckpointError(f"{source} is a convify checkpoint with a damaged recipe: {one_line(e)}") from e


# --------------------------------------------------------------------------- writing


def make_recipe(*, arch: str | ArchSpec, passes: Sequence[RecipePass],
                arch_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe part of a checkpoint (everything but the state_dict)."""
    return {
        "format": FORMAT,
        "version": RECIPE_VERSION,
        "arch": str(parse_arch(arch)),
        "arch_kwargs": _plain(dict(arch_kwargs or {}), "arch_kwargs"),
        "passes": [p.to_dict() for p in passes],
        "input_shape": list(passes[-1].input_shape) if passes else None,
    }


def to_checkpoint(model: nn.Module, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe from :func:`make_recipe` plus the model's weights (on the CPU)
    and their digest (any digest in ``recipe`` was another model's)."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {**recipe_of(recipe), "digest": weights_digest(state_dict), "state_dict": state_dict}


def save(model: nn.Module, path: str | os.PathLike[str], *, arch: str | ArchSpec,
         arch_kwargs: Mapping[str, Any] | None = None, passes: Sequence[RecipePass] | None = None,
         force: bool = False, check: bool = True) -> Path:
    """Write a rewritten model as a convify checkpoint (recipe plus state_dict).

    ``arch`` and ``arch_kwargs`` name the architecture the model was made
    from; the rewrites come from the model's report (``passes`` overrides
    them). ``check=True`` rebuilds the model once now and refuses to write a
    recipe that does not give back this model's state_dict.

    >>> m = torchvision.models.resnet18(num_classes=10).eval()
    >>> allconv = convify.convify(m, torch.randn(1, 3, 224, 224))
    >>> convify.save(allconv, "resnet18_allconv.pt", arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})
    """
    passes = passes_of(model) if passes is None else list(passes)
    recipe = make_recipe(arch=arch, passes=passes, arch_kwargs=arch_kwargs)
    checkpoint = to_checkpoint(model, recipe)
    if check:
        rebuilt = rebuild(recipe, source=str(path), trust_code=True)
        mismatch = compare_keys(rebuilt, checkpoint["state_dict"])
        if mismatch:
            raise CheckpointError(f"the recipe for {path} does not rebuild this model ({mismatch.describe()}); "
                                  "pass the arch and arch_kwargs it was made from")
    return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), force=force)


# --------------------------------------------------------------------------- loading


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def rebuild(recipe: Mapping[str, Any], *, source: str = "<recipe>", trust_code: bool = False) -> nn.Module:
    """Build the architecture a recipe names and apply its passes (weights
    not loaded). An import-path architecture needs ``trust_code=True``."""
    try:
        arch = parse_arch(recipe["arch"])
        arch_kwargs = dict(recipe.get("arch_kwargs") or {})
    except (KeyError, TypeError, ValueError, ConvifyError) as e:
        raise CheckpointError(f"{source} is a convify checkpoint with a damaged recipe: {one_line(e)}") from e
    passes = recipe_passes(recipe, source)
    if arch.runs_foreign_code and not trust_code:
        raise CheckpointError(
            f"{source} builds its model by calling {arch}, code chosen by whoever wrote the file; "
            "pass {trust_code} only if you trust that code")
    model = build_arch(arch, arch_kwargs)
    try:
        return apply_passes(model, passes).eval()
    except CheckpointError:
        raise
    except Exception as e:  # the passes come from a file: a damaged shape or option fails here
        raise CheckpointError(f"{source}: the passes of its recipe do not rebuild on {arch} ({one_line(e)}); "
                              "is the recipe damaged, or written by another convify version?") from e


def load(path: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Rebuild a rewritten model from a convify checkpoint, in eval mode.

    The architecture is built from the recipe, the same rewrites are applied,
    and the saved weights are loaded with ``strict=True``. A recipe whose
    architecture is an import path (``package.module:factory``) would run
    code chosen by the file's author: it is refused unless ``trust_code=True``.
    A file whose weights do not match the digest in its recipe is refused.

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
    """:func:`load` for a checkpoint dict already read from ``source``: the
    one place convify checkpoints are read, so the digest is checked here."""
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source} is a convify checkpoint without a state_dict")
    check_digest(obj, source)
    model = rebuild(obj, source=source, trust_code=trust_code)
    mismatch = compare_keys(model, state_dict)
    if mismatch:
        raise CheckpointError(f"the weights in {source} do not fit the model its recipe rebuilds "
                              f"({mismatch.describe()}); was it written by another convify version?")
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except Exception as e:
        raise CheckpointError(f"loading the weights in {source} failed: {one_line(e)}") from e
    return model.eval()


def recipe_of(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint without its state_dict and the digest of it."""
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "digest")}
