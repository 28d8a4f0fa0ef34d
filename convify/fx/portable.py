"""Whole pickled models that load without convify.

``torch.save(model)`` pickles classes and functions by import path, and
``torch.load`` imports them. A rewritten model could name convify in three
places; each is kept out:

* its report: pickled as plain data (:mod:`convify.core.report`), which
  ``convify.report`` reads back;
* its GraphModules' tracer class: torch.fx's own, except for a graph that
  rebuilds a ``ModelOutput`` (:func:`convify.fx.tracing.rebuilds_dict_outputs`);
* the guards its graphs call (:data:`convify.fx.tracing.GUARDS`): in a model
  to pickle, :func:`portable` writes each as its plain form, ``torch._assert``
  of the same condition (an ``AssertionError`` with the same message).

What cannot be kept out is listed by :func:`convify_names`: a convify module
in the model (``PadSame``, which pads timm's "same" max pooling, computing
its padding at run time), or the tracer of a graph that rebuilds a ``ModelOutput``.

>>> torch.save(portable(rewritten), "model.pt")   # convify.io.save_pickled does this
"""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

from convify.core.report import attach, report
from convify.fx.tracing import GUARDS


def _graph_modules(model: nn.Module) -> list[fx.GraphModule]:
    return [m for m in model.modules() if isinstance(m, fx.GraphModule)]


def _guard_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in GUARDS and not n.users]


def plain_guards(gm: fx.GraphModule) -> int:
    """Write every guard of ``gm``'s graph as its plain form, in place; how many."""
    found = _guard_nodes(gm)
    for node in found:
        with gm.graph.inserting_before(node):
            GUARDS[node.target](gm.graph, node)
        gm.graph.erase_node(node)
    if found:
        gm.graph.lint()
        gm.recompile()
    return len(found)


def portable(model: nn.Module) -> nn.Module:
    """``model`` to pickle: a copy whose guards are plain torch, or ``model``
    itself when it has none."""
    if not any(_guard_nodes(gm) for gm in _graph_modules(model)):
        return model
    out = copy.deepcopy(model)
    for gm in _graph_modules(out):
        plain_guards(gm)
    attach(out, report(model))  # a GraphModule's copy holds it in ``meta`` only, which unpickling drops
    return out


def _names_convify(obj: object) -> bool:
    return str(getattr(obj, "__module__", "")).split(".")[0] == "convify"


def convify_names(model: nn.Module) -> list[str]:
    """What a pickle of :func:`portable` ``(model)`` names in convify (loading
    it then needs convify installed): module classes, tracer classes, functions
    its graphs call other than the guards it writes as plain torch."""
    found: list[str] = []
    for name, m in model.named_modules():
        if _names_convify(type(m)):
            found.append(f"{type(m).__module__}.{type(m).__qualname__} (at {name or 'the model'})")
        if not isinstance(m, fx.GraphModule):
            continue
        tracer = getattr(m, "_tracer_cls", None)
        if tracer is not None and _names_convify(tracer):
            found.append(f"{tracer.__module__}.{tracer.__qualname__} (the tracer of a graph that rebuilds a "
                         "ModelOutput)")
        plain = set(_guard_nodes(m))
        found += [f"{n.target.__module__}.{n.target.__name__}" for n in m.graph.nodes
                  if n.op == "call_function" and _names_convify(n.target) and n not in plain]
    return list(dict.fromkeys(found))
