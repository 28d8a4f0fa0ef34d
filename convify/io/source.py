"""A model from what the user names: a file (a convify checkpoint, or a
pickled module with ``trust_pickle``), a Hugging Face model folder, or an
architecture with optional weights.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch.nn as nn

from convify.core.report import report
from convify.errors import CheckpointError, UsageError, one_line
from convify.io.arch import ArchSpec, build_arch, hf_config_dict, parse_arch, transformers_module
from convify.io.files import read_file
from convify.io.recipe import is_checkpoint, load_checkpoint, recipe_passes
from convify.io.state import load_weights, unwrap
from convify.wording import counted


@dataclass
class ModelSource:
    """A model as the user gave it, with what a recipe needs to rebuild it."""

    model: nn.Module
    label: str                            # for messages: "torchvision:resnet18 + w.pt"
    arch: ArchSpec | None = None          # None: a pickled module, no recipe possible
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None    # from a convify checkpoint
    files: tuple[Path, ...] = ()          # files read (never written over)

    @property
    def pickled(self) -> bool:
        return self.arch is None


def open_model(path: str | os.PathLike[str] | None = None, *, arch: str | None = None,
               arch_kwargs: Mapping[str, Any] | None = None, weights: str | os.PathLike[str] | None = None,
               trust_pickle: bool = False, trust_code: bool = False) -> ModelSource:
    """The model a user names: a file (convify checkpoint, or a pickled
    module with ``trust_pickle``), a Hugging Face model folder (``config.json``
    and ``model.safetensors``, as ``save_pretrained`` writes it), or ``arch``
    with optional ``weights`` (``path`` given together with ``arch`` is read
    as the weights).

    >>> open_model(arch="torchvision:resnet18", weights="resnet18.pth").model
    >>> open_model("my-resnet/").arch      # a folder: transformers' image classifier
    ArchSpec(kind='hf', name='ResNetForImageClassification')
    """
    if path is not None and weights is not None:
        raise UsageError("give the weights once: either as {path} or with {weights}, not both")
    if arch is not None:
        return _open_arch(arch, dict(arch_kwargs or {}), weights if weights is not None else path,
                          trust_pickle=trust_pickle)
    if weights is not None:
        raise UsageError("{weights} needs {arch}: say which architecture the weights belong to")
    if arch_kwargs:
        raise UsageError("{arch_kwargs} needs {arch}")
    if path is None:
        raise UsageError("no model given: name a {path} or an architecture with {arch}")
    if Path(path).is_dir():
        return _open_hf_folder(Path(path))
    return _open_file(Path(path), trust_pickle=trust_pickle, trust_code=trust_code)


def open_original(rewritten: ModelSource, path: str | os.PathLike[str], *, trust_pickle: bool = False,
                  trust_code: bool = False) -> ModelSource:
    """The original that ``rewritten`` (a convify checkpoint, or a rewritten
    module) was made from, to verify it against: ``path`` holds the original's
    weights, a state_dict for the architecture the checkpoint's recipe names
    (built with its arguments, the weights loaded strictly), or the whole
    original (a convify checkpoint without rewrites, or a pickled module with
    ``trust_pickle``).

    >>> allconv = open_model("resnet18_allconv.pt")
    >>> convify.verify(open_original(allconv, "resnet18_cifar.pth").model, allconv.model)
    """
    wpath = Path(path)
    content = read_file(wpath, trust_pickle=trust_pickle, what="file of the original")
    if is_checkpoint(content):
        model = load_checkpoint(content, source=str(wpath), trust_code=trust_code)
        if report(model).replaced:
            raise UsageError(f"{wpath} is a rewritten model too, not the original {rewritten.label} was made from: "
                             "give the original's weights")
        return ModelSource(model, str(wpath), parse_arch(content["arch"]), dict(content.get("arch_kwargs") or {}),
                           files=(wpath,))
    content = unwrap(content, wpath)
    if isinstance(content, nn.Module):
        return ModelSource(content.eval(), str(wpath), files=(wpath,))
    if rewritten.arch is None:
        raise UsageError(f"{wpath} holds a state_dict, but {rewritten.label} names no architecture to load it into "
                         "(it is not a convify checkpoint): give the whole original model file")
    model = build_arch(rewritten.arch, rewritten.arch_kwargs)
    load_weights(model, content, source=str(wpath), target=str(rewritten.arch))
    return ModelSource(model.eval(), f"{rewritten.arch} + {wpath}", rewritten.arch, dict(rewritten.arch_kwargs),
                       files=(wpath,))


def _open_hf_folder(path: Path) -> ModelSource:
    """A Hugging Face model folder, loaded with ``from_pretrained(path,
    local_files_only=True)``. Its recipe names the class and holds the whole
    configuration (``hf:CLASS``, ``config={...}``), so a checkpoint rebuilds
    without the folder. Nothing here needs trust: config.json is data,
    ``trust_remote_code`` stays False (a folder that needs code of its own is
    refused by transformers) and the weights load without pickle."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder without config.json: give a model file, or a Hugging Face "
                              "model folder as save_pretrained writes it (config.json, model.safetensors)")
    transformers = transformers_module(f"the Hugging Face model folder {path}")
    try:
        with _quiet(transformers):
            model = transformers.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"loading the Hugging Face model in {path} failed: {one_line(e)}; convify reads "
                              "image classifiers (AutoModelForImageClassification)") from e
    files = tuple(p for p in sorted(path.iterdir()) if p.is_file())
    spec = ArchSpec("hf", type(model).__name__)
    return ModelSource(model.eval(), str(path), spec, {"config": hf_config_dict(model.config)}, files=files)


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
            raise UsageError(f"{wpath} is a convify checkpoint: it names its own architecture, so give it "
                             "as {path} without {arch}")
        content = unwrap(content, wpath)
        state_dict = content.state_dict() if isinstance(content, nn.Module) else content
    model = build_arch(spec, arch_kwargs)
    label = str(spec)
    if spec.kind == "hf" and os.path.isdir(spec.name):  # hf:DIR: the recipe keeps the class and config, not a path
        spec, arch_kwargs = ArchSpec("hf", type(model).__name__), {"config": hf_config_dict(model.config)}
    if state_dict is not None:
        load_weights(model, state_dict, source=str(weights), target=str(spec))
        label += f" + {weights}"
    return ModelSource(model.eval(), label, spec, arch_kwargs, files=files)


def _open_file(path: Path, *, trust_pickle: bool, trust_code: bool) -> ModelSource:
    content = read_file(path, trust_pickle=trust_pickle)
    if is_checkpoint(content):
        model = load_checkpoint(content, source=str(path), trust_code=trust_code)
        passes = recipe_passes(content, str(path))
        shape = passes[-1].input_shape if passes else None
        return ModelSource(model, str(path), parse_arch(content["arch"]), dict(content.get("arch_kwargs") or {}),
                           shape, (path,))
    content = unwrap(content, path)
    if isinstance(content, nn.Module):
        return ModelSource(content.eval(), str(path), files=(path,))
    raise UsageError(f"{path} holds a state_dict ({counted(len(content), 'tensor')}) but no architecture: say which "
                     "with {arch} torchvision:NAME, timm:NAME or package.module:factory; a Hugging Face "
                     "model is given as its folder (config.json next to the weights)")


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bar in the middle of convify's output."""
    bars = transformers.utils.logging
    was_enabled = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            bars.enable_progress_bar()
