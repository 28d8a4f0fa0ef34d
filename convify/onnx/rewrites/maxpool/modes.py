"""A pooling mode in the ONNX frontend: the base class and its registry.

A mode is an :class:`OnnxPoolMode` subclass in its own file of this package,
registered with :func:`onnx_pool_mode` for the core's
:class:`~convify.core.rewrites.maxpool.PoolMode` it implements (the same
modes, options and records as the torch.fx frontend's). Its
:meth:`~OnnxPoolMode.apply` rewrites one site and returns its row, whose
``detail`` is a :class:`~convify.core.rewrites.maxpool.PoolRecord`.
"""
from __future__ import annotations

import abc
from typing import Callable, ClassVar, Sequence

import numpy as np
import onnx_ir as ir

from convify.core.report import Replaced
from convify.core.rewrites.maxpool import POOL_MODES, MaxPoolOptions, PoolMode, register_pool_mode
from convify.errors import UsageError
from convify.wording import counted
from convify.onnx.building import GraphEditor
from convify.onnx.rewrites.base import Site
from convify.onnx.rewrites.maxpool.window import PoolSite

#: Element types whose weights numpy holds, by the ONNX type.
NUMPY_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16}


class OnnxPoolMode(abc.ABC):
    """What one pooling mode makes of a ``MaxPool`` node."""

    mode: ClassVar[PoolMode]

    def skip_reason(self, site: Site[PoolSite], options: MaxPoolOptions) -> str | None:
        """Why this mode must leave a site alone, or None. Asked once per
        site, before any is applied (its sign proof is set)."""
        return None

    @abc.abstractmethod
    def apply(self, edit: GraphEditor, site: Site[PoolSite], options: MaxPoolOptions) -> Replaced:
        """Rewrite one site (not skipped) through ``edit``."""

    def finish(self, rows: Sequence[Replaced], options: MaxPoolOptions) -> list[str]:
        """Notes for the pass once every site is applied."""
        return []


#: The ONNX implementation of each pooling mode, by name.
ONNX_POOL_MODES: dict[str, OnnxPoolMode] = {}


def onnx_pool_mode(mode: PoolMode) -> Callable[[type[OnnxPoolMode]], type[OnnxPoolMode]]:
    """Class decorator: ``cls`` implements pooling mode ``mode`` for ONNX
    graphs (registered in the core too, if it is not yet)."""

    def register(cls: type[OnnxPoolMode]) -> type[OnnxPoolMode]:
        register_pool_mode(mode)
        cls.mode = mode
        ONNX_POOL_MODES[mode.name] = cls()
        return cls

    return register


def pool_mode_for(name: str) -> OnnxPoolMode:
    """The ONNX implementation of pooling mode ``name``; a
    :class:`~convify.errors.UsageError` names the modes that apply."""
    try:
        return ONNX_POOL_MODES[name]
    except KeyError:
        implemented = [m for m in POOL_MODES if m in ONNX_POOL_MODES] + [
            m for m in ONNX_POOL_MODES if m not in POOL_MODES]
        where = " (convify does it on torch.fx graphs)" if name in POOL_MODES else ""
        raise UsageError(f"pooling mode {name!r} has no ONNX implementation{where}; for ONNX models use mode="
                         f"{', '.join(repr(m) for m in implemented)}") from None


def numpy_dtype(site: Site[PoolSite]) -> type:
    """The numpy type of the site's input, which its new weights take."""
    return NUMPY_FLOATS[site.params.dtype]


def dtype_reason(site: Site[PoolSite], allowed: Sequence[ir.DataType], why: str = "") -> str | None:
    """Why the site's element type is not one the mode builds, or None."""
    dtype = site.params.dtype
    if dtype in allowed:
        return None
    names = ", ".join(t.name for t in allowed)
    return f"its input is {dtype.name}; this mode builds {names} weights{why}; convert the model to FLOAT first"


def replaced_notes(edit: GraphEditor, site: Site[PoolSite], first: int) -> tuple[str, ...]:
    """The notes that name the ONNX node replaced and those added since
    ``edit.added[first]``, with the initializers they read."""
    nodes = edit.added[first:]
    added = ", ".join(f"{n.name} ({n.op_type})" for n in nodes)
    weights = {v.name for n in nodes for v in n.inputs if v is not None and v.is_initializer()}
    notes = [f"ONNX node {site.name} (MaxPool) replaced by {counted(len(nodes), 'node')}: {added}"]
    if weights:
        notes.append(f"initializers added: {', '.join(sorted(weights))}")
    pool = site.params
    if pool.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        size = "x".join(map(str, pool.spatial))
        notes.append(f"auto_pad={pool.auto_pad} resolved at the input size {size}: pads "
                     f"{list(pool.params.padding) + list(pool.params.pads_end)}; other sizes need another rewrite")
    if pool.dtype == ir.DataType.DOUBLE:
        notes.append("DOUBLE: onnxruntime's CPU provider has no DOUBLE Conv kernel (the original's MaxPool has "
                     "one); run it in FLOAT, or with a runtime that has one (onnx.reference does)")
    return tuple(notes)
