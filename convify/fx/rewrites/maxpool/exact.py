"""``mode="exact"``: the max pooling becomes convolutions and ReLUs that
compute it exactly (up to float rounding), on any input.

``max(a, b) = b + relu(a - b)``. Per axis of the window (last axis first), a
chain of depthwise convolutions (:mod:`.chain`, weights in
:func:`convify.core.maxtree.depthwise_chain`): ``t = relu(z0 - z1)``,
``t = relu(z1 - z2 + t)``, ..., ``max = z_{k-1} + t``, one module
(a ``GraphModule``, :mod:`.chain`) at the pool's name. Borders:

* signed input: padding that copies valid taps of each window
  (:class:`~.padding.TapPad`, ``nn.ReplicationPadNd`` where dilation is 1);
* input proven >= 0 (:mod:`convify.fx.nonnegative`): zero padding, inside
  the convolutions (explicit zeros where ``ceil_mode`` or "same" padding
  needs them).

Generated code, before and after (resnet18's ``MaxPool2d(3, 2, 1)`` after a ReLU)::

    maxpool = self.maxpool(relu)    # MaxPool2d(3, 2, 1)
    maxpool = self.maxpool(relu)    # GraphModule: three Conv2d(64, 64, (1, 3), s=(1, 2), p=(0, 1), groups=64)
                                    #   chained by + and ReLU, then three (3, 1) ones, s=(2, 1), p=(1, 0)

The default form (``exact_form="chain"``, :class:`MaxPoolOptions`), by measurement (``benchmarks/ort_latency.py``, batch
1, one thread, exact / original, RESULTS.md has the tables):

1. the issue's prototype, the **separable** tree of grouped convolutions that
   carry values as channels (``relu(b) - relu(-b)``, 5, 3, 5, 3, 1 channels per
   input channel for a signed 3x3 window), beat the **direct** tree over the
   whole window in eager PyTorch (``benchmarks/exact_pool.py``: resnet18's
   pool 3.29x vs 3.85x of the max pooling signed, 0.73x vs 1.33x >= 0);
   onnxruntime ran it at 1.066x (resnet18), 1.068x (vgg11), 1.006x
   (alexnet), 1.46x (googlenet), 1.54x (squeezenet1_1) of the original: its grouped
   convolutions with 2-5 channels per group have no NCHWc kernel, so
   onnxruntime runs them as one small GEMM per group;
2. the **chain** of depthwise convolutions (this default) carries values by additions instead,
   so every convolution has one channel in and one out: onnxruntime fuses each
   step into one NCHWc depthwise convolution with its sum and ReLU, and the
   tree sits in the NCHWc graph between its neighbours with no reordering.
   That brought onnxruntime to 0.95-1.01x (resnet18, vgg11, alexnet,
   densenet121, inception_v3), 1.05x (googlenet), 1.06-1.07x (squeezenet1_1:
   six depthwise passes where NCHWc max pooling makes one, on a 7 ms model),
   and eager PyTorch from 1.61x to 0.78x on googlenet; it halves the added
   parameters and MACs. A value needs one channel whatever its sign (the carried ``b`` is
   added back, not passed through a ReLU), so signed sites differ only in
   their padding. The price: a site is convolutions, ReLUs and additions.

``exact_form="separable"`` and ``"direct"`` are convolutions and ReLUs only,
for tools that take nothing else (neural-network verifiers): a site proven
>= 0 is then ``Conv, ReLU, ..., Conv`` with its zero padding inside the
convolutions, a ``ceil_mode`` pooling's extra right/bottom zeros too
(PyTorch's convolutions pad both sides alike: zero taps lead the kernel,
:func:`convify.core.maxtree.zeros_inside`; a ``ConstantPadNd`` only where
a dilation does not divide them); a signed site starts with the padding
that copies valid taps.
``grouped=False`` writes every convolution of the tree as an ordinary one
(``groups=1``) with block-diagonal weights (:func:`convify.core.maxtree.ungrouped_weight`),
for tools that refuse grouped convolutions (Marabou's ONNX parser): the
same numbers at ``C`` times the MACs.

Not done, and why: folding the tree's last layer into the convolution that
follows. In the depthwise form that layer is a one-tap depthwise
convolution fused with its sum (one pass over the pooled map); folding it
would make the next convolution read the sum's two inputs (twice its input
channels and MACs) to save that pass. Sharing levels between overlapping
windows (stride 1): doubling shared pairwise maxes needs ``2 ceil(log2 k)``
convolutions along an axis of ``k`` taps against the chain's ``k`` (4 against
3 for the zoo's 3-tap axes); it pays from 7 taps on.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from convify.core import maxtree
from convify.core import weights as W
from convify.core.maxtree import TreeForm
from convify.core.report import Replaced
from convify.core.rewrites.maxpool import EXACT, SPEC, ExactTree, MaxPoolOptions, PoolParams, PoolRecord
from convify.fx import nodes, ops, shapes
from convify.fx.nonnegative import nonnegative_proof
from convify.fx.rewrites.base import Site
from convify.fx.rewrites.maxpool.chain import depthwise_max_tree, relu_levels
from convify.fx.rewrites.maxpool.modes import (FxPoolMode, device_at, new_module_target, pool_mode, site_input,
                                               site_shapes, swap_in)
from convify.fx.rewrites.maxpool.padding import TapPad
from convify.fx.rewrites.maxpool.same import PadSame
from convify.zoo import count_macs

#: ``node.meta`` key of a site's sign proof, worked out before any site of the graph is rewritten.
SIGN_META = "convify_nonnegative"

_REPLICATION_PADS = {1: nn.ReplicationPad1d, 2: nn.ReplicationPad2d, 3: nn.ReplicationPad3d}
_CONSTANT_PADS = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}


@pool_mode(EXACT)
class Exact(FxPoolMode):
    def skip_reason(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> str | None:
        inp = shapes.input_info(site.node)
        reason = empty_window_reason(site.params, inp.shape[2:]) if inp is not None else None
        if reason is None:
            # proven on the graph as it is now: an earlier site's tree is no max pooling to walk through
            site.node.meta[SIGN_META] = nonnegative_proof(gm, site_input(site.node))
        return reason

    def apply(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> Replaced:
        params, node = site.params, site.node
        inp, out = site_shapes(site)
        proof = node.meta.pop(SIGN_META) if SIGN_META in node.meta else nonnegative_proof(gm, site_input(node))
        form = options.form
        tree, padding = exact_tree(params, inp.shape[1], signed=proof is None, form=form, grouped=options.grouped,
                                   dtype=inp.dtype, device=device_at(gm, node, inp))
        target, training = new_module_target(gm, site)
        nodes.set_submodule(gm, target, tree.train(training))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (site_input(node),))
        swap_in(gm, site, new)
        record = describe_tree(tree, params, inp.shape, signed=proof is None, padding=padding, form=form,
                               sign_proof=proof, grouped=options.grouped)
        levels = "ReLU level" if record.relu_levels == 1 else "ReLU levels"
        ungrouped = "" if options.grouped else ", ungrouped"
        text = (f"exact max tree ({form.value}{ungrouped}, {record.relu_levels} {levels}, "
                f"{'signed' if record.signed else '>=0'})")
        return Replaced(SPEC.name, site.name, site.op, text, inp.shape, out.shape if out else None, exact=True,
                        module=target, notes=(record.describe(),), detail=PoolRecord(params, EXACT.name, tree=record))

    def finish(self, rows: Sequence[Replaced], options: MaxPoolOptions | None = None) -> list[str]:
        if options is None or options.init == "avg" or not rows:
            return []
        return [f"init={options.init!r} does not apply to mode='exact': its weights are set to compute the max "
                "pooling exactly (nothing to draw or fit)"]


def empty_window_reason(params: PoolParams, spatial: Sequence[int]) -> str | None:
    """Why some window of the pooling holds padding only at this input size
    (PyTorch gives -inf there, which no convolution gives), or None."""
    for axis, n in enumerate(spatial):
        k, s, d = params.kernel[axis], params.stride[axis], params.dilation[axis]
        left, right = W.same_padding(n, k, s, d) if params.same else (params.padding[axis],) * 2
        outputs = W.pool_output_size(n + (left + right if params.same else 0), k, s, 0 if params.same else left, d,
                                     params.ceil_mode)
        for o in range(outputs):
            if not any(0 <= o * s - left + i * d < n for i in range(k)):
                return (f"at the traced size ({n} along axis {axis}) its window {o} holds padding only, where "
                        "the max pooling gives -inf and no convolution can; trace it at a larger size")
    return None


def exact_tree(params: PoolParams, channels: int, *, signed: bool, form: TreeForm, dtype: torch.dtype,
               device: torch.device | None = None, grouped: bool = True) -> tuple[nn.Module, str]:
    """The layers that compute ``params.pool`` exactly on ``channels``
    channels (on inputs >= 0 only when not ``signed``), and how they pad.
    ``grouped=False``: ordinary convolutions with block-diagonal weights.

    >>> tree, _ = exact_tree(PoolParams.of(2, 3, 2, 1, 1, False, False), 64, signed=False,
    ...                      form=TreeForm.SEPARABLE, dtype=torch.float32)
    """
    dims = params.dims
    pad, inside, extra, padding = _borders(params, signed)
    if form is TreeForm.CHAIN:
        return depthwise_max_tree(dims, params.kernel, params.stride, params.dilation, channels, pad=pad,
                                  padding=inside, extra=extra, dtype=dtype, device=device, grouped=grouped), padding
    layers: list[nn.Module] = [pad] if pad is not None else []
    for layer in maxtree.max_tree(params.kernel, params.stride, params.dilation, signed=signed, form=form,
                                  padding=inside, extra=extra):
        weight = maxtree.channel_weight(layer.weight, channels, grouped=grouped, dtype=dtype, device=device)
        # skip_init: the default random init would be overwritten at once
        conv = nn.utils.skip_init(ops.CONV_MODULES[dims], channels * layer.weight.shape[1], weight.shape[0],
                                  tuple(layer.weight.shape[2:]), stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, groups=channels if grouped else 1, bias=False,
                                  device=device, dtype=dtype)
        conv.weight = nn.Parameter(weight)
        layers.append(conv)
        if layer.relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers), padding


def _borders(params: PoolParams, signed: bool) -> tuple[nn.Module | None, tuple[int, ...] | None,
                                                        tuple[int, ...] | None, str]:
    """The padding module before the tree (or None), the zero padding inside
    its convolutions (or None), ceil_mode's extra right zeros inside them
    too (or None), and a sentence on why the borders are exact."""
    dims, extra = params.dims, params.extra_pad
    pairs = [(p, p + e) for p, e in zip(params.padding, extra)]
    flat = tuple(v for pair in reversed(pairs) for v in pair)  # F.pad's order: the last axis first
    if signed:
        copies = "padding copies a valid tap of each window"
        if params.same:
            return TapPad(params.kernel, params.stride, params.dilation, same=True), None, None, f"'same' {copies}"
        if not any(flat):
            return None, None, None, "no padding"
        if any(d > 1 for d in params.dilation):
            return (TapPad(params.kernel, params.stride, params.dilation, padding=pairs), None, None,
                    f"{copies} (the first/last d elements repeated along dilated axes)")
        return _REPLICATION_PADS[dims](flat), None, None, f"{copies} (edge replication)"
    zeros = "zero padding (exact: the input is >= 0 and every window holds a valid tap)"
    if params.same:
        return PadSame(params.kernel, params.stride, params.dilation), None, None, f"'same' {zeros}"
    if any(extra) and not maxtree.extra_fits_inside(extra, params.dilation):
        return _CONSTANT_PADS[dims](flat, 0.0), None, None, zeros
    if any(extra):  # ceil_mode's right zeros too, as zero taps leading the kernels (maxtree.zeros_inside)
        return None, params.padding, extra, f"{zeros}, inside the convolutions (ceil_mode's too)"
    return None, params.padding, None, f"{zeros}, inside the convolutions" if any(params.padding) else "no padding"


def describe_tree(tree: nn.Module, params: PoolParams, in_shape: Sequence[int], *, signed: bool, padding: str,
                  form: TreeForm, sign_proof: str | None, grouped: bool = True) -> ExactTree:
    """The record of a built tree; its MACs counted at the traced size, one image."""
    convs = [m for m in tree.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    first = next(iter(tree.parameters()))
    macs = count_macs(tree, torch.zeros(1, *in_shape[1:], dtype=first.dtype, device=first.device))
    return ExactTree(form=form, signed=signed, padding=padding,
                     channels=tuple(c.out_channels // in_shape[1] for c in convs),  # per pooled channel
                     relu_levels=relu_levels(tree),
                     parameters=sum(p.numel() for p in tree.parameters()), macs=macs, sign_proof=sign_proof,
                     grouped=grouped)
