"""Reading and writing models, one job per module.

* ``arch``: architecture specs (``torchvision:NAME``, ``timm:NAME``,
  ``package.module:factory``) and building them;
* ``files``: reading model and weights files without running their code;
* ``state``: state dicts as training scripts save them, and loading them;
* ``recipe``: convify checkpoints (a recipe of rewrite passes plus weights):
  ``save``, ``load``, rebuilding;
* ``digest``: the SHA-256 of a checkpoint's weights that ``load`` checks;
* ``writing``: atomic writes that never clobber an input or a file, whole pickled models;
* ``source``: a model from what a user names (``open_model``).
"""
from __future__ import annotations

from convify.io.arch import ArchSpec, build_arch, parse_arch, parse_arch_kwargs
from convify.io.files import read_file, read_safetensors
from convify.io.recipe import (RecipePass, apply_passes, is_checkpoint, load, load_checkpoint, make_recipe, passes_of,
                               plan_passes, rebuild, rebuild_dense, recipe_of, recipe_passes, save, to_checkpoint)
from convify.io.source import ModelSource, open_model, open_original
from convify.io.state import KeyMismatch, compare_keys, load_weights, strip_prefixes, unwrap
from convify.io.writing import atomic_write, check_output, save_pickled

__all__ = [
    "ArchSpec", "KeyMismatch", "ModelSource", "RecipePass", "apply_passes", "atomic_write", "build_arch",
    "check_output", "compare_keys", "is_checkpoint", "load", "load_checkpoint", "load_weights", "make_recipe",
    "open_model", "open_original", "parse_arch", "parse_arch_kwargs", "passes_of", "plan_passes", "read_file",
    "read_safetensors", "rebuild", "rebuild_dense", "recipe_of", "recipe_passes", "save", "save_pickled",
    "strip_prefixes", "to_checkpoint", "unwrap",
]
