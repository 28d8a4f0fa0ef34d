"""Linear classifier heads become convolutions (OverFeat; Long et al.'s FCN;
Lin et al.'s Network in Network for the global-average head).

A site is one head: a Linear fed by a flattened spatial map, plus every Linear
and elementwise op after it up to a model output. Walking back from the first
Linear::

    map (N, C, *S) -[global/adaptive avg pool]-[per-position ops]-> P -flatten-> (N, F) -[elementwise]-> Linear

and forward: Linear -[elementwise]-> Linear ... -> output (possibly inside a
tuple or namedtuple for auxiliary heads). A Linear whose result flows back
into a feature map (squeeze-excitation, attention, token MLPs) is no head and
no site. A Linear that looks like a head but cannot be converted is a skipped
site with the reason.

Modes:

* ``conv``: the first Linear becomes ``ConvNd(C, K, kernel=S_P)`` on ``P`` (its
  weight reshaped), every later Linear a 1x1 convolution, and a flatten keeps
  the ``(N, K)`` output. Exact at the traced size.
* ``gap``: the paper's head (Network in Network, All-CNN-C) for a head that
  reads a flattened map (VGG, AlexNet, LeNet): one 1x1 convolution to the K
  classes on the map in front of the flatten (an average pooling there goes
  too), global average pooling, a flatten; the hidden Linears, their
  activations, dropouts and BatchNorm1d are gone. Initialized without data
  by the product of the head's weight matrices summed over the positions
  (exact on spatially constant maps when the activations between the Linears
  are identities), or with ``calibration=`` by least squares from the pooled
  features toward the original logits. Not exact. A head behind a global
  average (ResNet style) becomes what ``gap_mlp`` makes of it, which is exact
  there.
* ``gap_mlp``: a 1x1 convolution (the first Linear's weight summed over
  ``S_P``), global average pooling, then the rest of the head as 1x1
  convolutions and a flatten. Exact for GAP -> Linear heads; for a head on a
  flattened map an initialization that keeps the MLP and its activations,
  so it stays much closer to a trained model than ``gap``'s single
  convolution, at the MLP's size (VGG-11: 32.2M parameters against ``gap``'s
  9.7M, the original's 132.9M).

``dense=True`` also removes what pins the spatial size: the final flatten, a
global average pooling (the head then runs at every position) and an adaptive
pooling that is an identity at the traced size.

The new convolutions are the standard ``nn.Conv1d/2d/3d``, each under its
Linear's module name, so checkpoints and exports see ordinary modules;
``convify.matmul_heads`` is the opt-in that runs them as one matrix multiply
on CPU.

Generated code, before and after (``resnet18``, ``dense=True``)::

    avgpool = self.avgpool(layer4);  flatten = torch.flatten(avgpool, 1);  fc = self.fc(flatten)
    fc = self.fc(layer4)                                  # Conv2d(512, 1000, 1)

This package is the one rewrite: this file declares it (options, record,
finding sites, the order of the steps); each step is a module of its own:

* :mod:`.matching`: walking the graph to a :class:`~.matching.Head`
  (flatten, reduction, pooling, the Linears after it); changes nothing;
* :mod:`.plan`: the :class:`~.plan.HeadPlan` of one head: the map its first
  convolution reads, the kernel, the :class:`~.plan.PoolRemoval`;
* :mod:`.exactness`: what the planned head computes (:class:`~.exactness.Exactness`);
* :mod:`.building`: the new convolutions and the graph surgery;
* :mod:`.sizing`: the guard of a head that gives the original's output at one map size only.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from convify.core.report import Replaced
from convify.core.rewrites.head import SPEC, HeadMode, HeadOptions, HeadRecord
from convify.fx import nodes
from convify.fx.rewrites import implements
from convify.fx.rewrites.base import Rewrite, Site
from convify.fx.rewrites.head.building import describe_new, out_shape, rebuild
from convify.fx.rewrites.head.exactness import judge
from convify.fx.rewrites.head.matching import (Head, describe_head, describe_node, feeds_a_map, head_tree,
                                               is_stock_linear, reaches_output, scope_type, shape, walk_back)
from convify.fx.rewrites.head.plan import HeadPlan, plan_head


@implements(SPEC)
class ReplaceLinearHead(Rewrite[HeadPlan]):
    """Linear heads become convolutions; see :class:`HeadOptions`."""

    options: HeadOptions

    def nothing_found(self, model: nn.Module) -> str:
        linears = sum(isinstance(m, nn.Linear) for m in model.modules())
        if linears == 0:
            return (f"no Linear head: {type(model).__name__} has no nn.Linear (its classifier is already "
                    "convolutional); nothing to do")
        return (f"no Linear head: none of the {linears} nn.Linear layers of {type(model).__name__} reads a "
                "flattened feature map on its way to an output (attention, squeeze-excitation and token "
                "MLPs are left alone)")

    # ------------------------------------------------------------------ finding

    def find_sites(self, gm: fx.GraphModule) -> list[Site]:
        sites: list[Site] = []
        taken: set[fx.Node] = set()
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        name_for = nodes.CallNames()  # a Linear called by several heads: one site per call, named like the engine's split
        for node in gm.graph.nodes:
            if node in taken:
                continue
            site = self._site_at(gm, node, order)
            if site is None:
                continue
            site.name = name_for(site.name)
            sites.append(site)
            if site.params is not None:
                taken.update(site.params.tree)
        return sites

    def _site_at(self, gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> Site | None:
        functional = node.op == "call_function" and node.target is F.linear
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, nn.Linear):
                return None
        elif not functional:
            return None
        inp = shape(node.args[0] if node.args else None)
        if inp is None or len(inp) != 2:
            return None  # a Linear on tokens or vectors, not on a flattened map
        found = walk_back(gm, node)
        if found is None:
            return None
        if feeds_a_map(node):
            return None  # squeeze-excitation and the like: the result goes back into a feature map
        name = node.target if node.op == "call_module" else nodes.join(nodes.scope_of(node), "linear")
        reason = found if isinstance(found, str) else None
        if reason is None and functional:
            owner = scope_type(node)
            if owner is not None and issubclass(owner, nn.Linear):
                name = nodes.scope_of(node)
                reason = (f"{owner.__name__} subclasses nn.Linear with its own forward (torch.fx traced into "
                          "it); its convolution would not compute the same")
            else:
                reason = ("functional F.linear: its weight is not a module; write the head with nn.Linear "
                          "to convert it")
        if reason is None and not is_stock_linear(gm.get_submodule(node.target)):
            reason = (f"{type(gm.get_submodule(node.target)).__name__} subclasses nn.Linear with its own "
                      "forward; its convolution would not compute the same")
        if reason is None and not reaches_output(node):
            reason = "its result does not reach a model output; convify converts classifier heads only"
        if reason is not None:
            return Site(name, node, describe_node(gm, node) if not functional else "F.linear", skip_reason=reason)
        tree, linears = head_tree(gm, node, order)
        head = dataclasses.replace(found, tree=tree, linears=linears)
        return Site(name, node, describe_head(gm, head), params=head)

    # ------------------------------------------------------------------ applying

    def apply(self, gm: fx.GraphModule, site: Site) -> Replaced:
        head: Head = site.params
        plan = plan_head(head, HeadMode(self.options.mode), self.options.dense)
        exactness, why = judge(gm, head, plan)  # on the original head, before the rebuild erases it
        in_shape, out = shape(plan.source), out_shape(head, plan)
        names = tuple(n.target for n in head.linears)
        modules = tuple(dict.fromkeys(n.target for n in head.tree if n.op == "call_module"))
        before = _parameters(gm, modules)
        notes = (plan.kept_mlp, plan.note, *rebuild(gm, head, plan), why)
        kept = names[:1] if plan.collapsed else names
        after = _parameters(gm, kept if plan.collapsed else modules)  # the same names, now convolutions
        if plan.collapsed:
            dropped = f"dropped the hidden layers {', '.join(names[1:])}; " if len(names) > 1 else ""
            notes += (f"gap: {dropped}the head has {after:,} parameters instead of {before:,}",)
        record = HeadRecord(kept, plan.kernel, plan.mode, plan.dense, plan.removal, exactness,
                            collapsed=plan.collapsed, dropped=names[len(kept):], parameters=(before, after))
        return Replaced(self.name, site.name, site.op, describe_new(gm, head, plan), in_shape, out,
                        exact=exactness.exact, module=site.node.target, notes=tuple(n for n in notes if n),
                        detail=record)


def _parameters(gm: fx.GraphModule, modules: Sequence[str]) -> int:
    return sum(p.numel() for name in modules for p in gm.get_submodule(name).parameters())
