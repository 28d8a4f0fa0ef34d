"""A ``MaxPool`` node's window, read into the core's
:class:`~convify.core.rewrites.maxpool.PoolParams`, or the reason it cannot be.

Every opset's attributes (1, 8, 10, 11, 12, 22): ``kernel_shape``,
``strides``, ``pads`` (begin and end apart: ``PoolParams.padding`` and
``padding_end``), ``dilations`` and ``ceil_mode`` (from 10), ``auto_pad``;
``storage_order`` only orders the Indices output, which a replaced site has
none of. ``auto_pad``:

* ``VALID``: no padding;
* ``SAME_UPPER`` / ``SAME_LOWER``: resolved at the input's static size to
  explicit pads, the odd one after (UPPER) or before (LOWER) the input,
  as the ONNX spec computes them; skipped with the reason: a dynamic size
  along a pooled axis (its padding would have to be computed in the graph
  at run time), a dilated window (onnxruntime pads those as if the kernel
  were not dilated, against the spec, so the two disagree on the output
  size) and a negative padding (a window shorter than its stride: the spec
  does not clamp it, ONNX's reference crops, onnxruntime refuses);
* ``NOTSET``: ``pads``.

``ceil_mode``: the windows that overhang the end are made by
``PoolParams.extra_pad`` more zeros (or copies) after the input, which
follows ONNX's rule that a window may not start in the end padding. Where the
output's size is inferred, the convolution's is checked against it.

At a static size, a window of padding only (the pooling gives -inf there)
and an empty output are skipped. Along a dynamic axis the rewrite holds at
every size where neither happens; at the sizes where one does, the
rewritten graph differs (onnxruntime's Conv refuses an input shorter than
its window, where the MaxPool returns an empty tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import onnx_ir as ir

from convify.core import weights as W
from convify.core.report import SkipCause
from convify.core.rewrites.maxpool import PoolParams
from convify.onnx.values import ShapeTable, ValueInfo, attribute, consumers, label, opset_of_node

#: The spatial dimensions the core's convolutions and pools cover.
MAX_DIMS = 3


@dataclass(frozen=True)
class PoolSite:
    """What the max pooling rewrite reads at one ``MaxPool`` node.

    ``spatial``: the input's spatial size (None where dynamic); ``opset``:
    the ONNX domain version the new nodes are written at; ``auto_pad`` as
    the node had it; ``sign_proof``: what makes the input >= 0 (worked out
    before any site is rewritten), None when not proven.
    """

    params: PoolParams
    channels: int
    spatial: tuple[int | None, ...]
    dtype: ir.DataType
    opset: int
    auto_pad: str = "NOTSET"
    sign_proof: str | None = None

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return self.params.padding

    @property
    def pads_end(self) -> tuple[int, ...]:
        """The padding after the input, ceil_mode's extra windows included."""
        return tuple(e + x for e, x in zip(self.params.pads_end, self.params.extra_pad))

    @property
    def signed(self) -> bool:
        return self.sign_proof is None

    def describe(self) -> str:
        text = self.params.describe("MaxPool")
        return text if self.auto_pad == "NOTSET" else f"{text[:-1]}, auto_pad={self.auto_pad})"

    def with_proof(self, proof: str | None) -> "PoolSite":
        return replace(self, sign_proof=proof)


def indices_reason(node: ir.Node) -> str | None:
    """Why a site whose Indices output is used must stay, or None."""
    if len(node.outputs) < 2 or node.outputs[1] is None:
        return None
    indices = node.outputs[1]
    readers = [label(n) for n in consumers(indices)]
    if indices.is_graph_output():
        readers.append("a graph output")
    if not readers:
        return None
    return f"its Indices output is used (by {', '.join(readers)}); a convolution has no indices"


def read_pool(node: ir.Node, shapes: ShapeTable) -> tuple[PoolSite | None, str | None, SkipCause | None]:
    """The site's :class:`PoolSite`, or None; why it is skipped, or None; and
    the cause a caller acts on (``UNSIZED``: no static channel count)."""
    inp, out = shapes.of(node.inputs[0]), shapes.of(node.outputs[0])
    kernel = attribute(node, "kernel_shape")
    if not kernel:
        return None, "it has no kernel_shape (the ONNX spec requires one); fix the model", None
    dims = len(kernel)
    reason = _input_reason(inp, dims)
    if reason:
        return None, reason, None
    if inp.channels is None:
        return None, (f"its input ({inp.describe()}) has no static channel count, which a convolution's weight "
                      "needs; give the model a fixed channel dimension"), SkipCause.UNSIZED
    strides = attribute(node, "strides") or [1] * dims
    dilations = attribute(node, "dilations") or [1] * dims
    auto_pad = attribute(node, "auto_pad", "NOTSET") or "NOTSET"
    spatial = tuple(inp.dim(2 + a) for a in range(dims))
    pads, reason = _resolve_pads(node, auto_pad, kernel, strides, dilations, spatial)
    if reason:
        return None, reason, None
    params = PoolParams.of(dims, kernel, strides, pads[:dims], dilations, attribute(node, "ceil_mode", 0),
                           len(node.outputs) > 1 and node.outputs[1] is not None, padding_end=pads[dims:])
    site = PoolSite(params, inp.channels, spatial, inp.dtype, opset_of_node(node), auto_pad)
    return site, window_reason(params, spatial) or _output_reason(site, out), None


def _input_reason(inp: ValueInfo, dims: int) -> str | None:
    if inp.dtype is not None and not inp.dtype.is_floating_point():
        return f"its input is {inp.dtype.name}; a convolution takes floating point only"
    if inp.dtype is None:
        return "its input's element type is unknown (no type was declared or inferred for it)"
    if inp.rank is None:
        return "its input's rank is unknown (no shape was declared or inferred for it)"
    if inp.rank != dims + 2:
        return f"its input has rank {inp.rank}, its kernel_shape {dims} dimensions: expected (N, C, *spatial)"
    if dims > MAX_DIMS:
        return f"a {dims}-d window; convify rewrites 1-, 2- and 3-d max pooling"
    return None


def _resolve_pads(node: ir.Node, auto_pad: str, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int], spatial: Sequence[int | None]) -> tuple[list[int], str | None]:
    dims = len(kernel)
    if auto_pad == "VALID":
        return [0] * 2 * dims, None
    if auto_pad == "NOTSET":
        pads = attribute(node, "pads") or [0] * 2 * dims
        if len(pads) != 2 * dims or any(p < 0 for p in pads):
            return [], f"its pads {pads} are not {2 * dims} values >= 0"
        return list(pads), None
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return [], f"auto_pad={auto_pad!r} is not one the ONNX spec defines"
    if any(d != 1 and k > 1 for k, d in zip(kernel, dilations)):
        return [], (f"auto_pad={auto_pad} with dilations {list(dilations)}: onnxruntime pads it as if the kernel "
                    "were not dilated, against the ONNX spec, so the two give different sizes; write its pads "
                    "explicitly")
    dynamic = [a for a, n in enumerate(spatial) if n is None]
    if dynamic:
        return [], (f"auto_pad={auto_pad} pads by the input's size, which is dynamic along spatial axis "
                    f"{dynamic[0]}; fix the input size to rewrite it")
    begin, end = [], []
    for axis, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        total = (-(-n // s) - 1) * s + d * (k - 1) + 1 - n
        if total < 0:  # the spec does not clamp it: the reference crops, onnxruntime refuses or differs
            return [], (f"auto_pad={auto_pad} pads spatial axis {axis} by {total} at its size {n} (a window shorter "
                        "than its stride): runtimes disagree on negative padding; write its pads explicitly")
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end, None


def output_size(params: PoolParams, axis: int, n: int) -> int:
    """The pooling's output length along ``axis`` for an input of length ``n``:
    the convolution's with its padding and ``extra_pad`` (the ONNX rule for ceil_mode)."""
    pad = params.padding[axis] + params.pads_end[axis] + params.extra_pad[axis]
    return W.conv_output_size(n, params.kernel[axis], params.stride[axis], 0, params.dilation[axis], extra=pad)


def window_reason(params: PoolParams, spatial: Sequence[int | None]) -> str | None:
    """Why some window holds padding only (the max pooling gives -inf there,
    which no convolution gives), or None: at the static size exactly, along a
    dynamic axis wherever the padding alone is as long as the window."""
    for axis, n in enumerate(spatial):
        k, s, d = params.kernel[axis], params.stride[axis], params.dilation[axis]
        begin, end = params.padding[axis], params.pads_end[axis] + params.extra_pad[axis]
        if n is None:
            if max(begin, end) > d * (k - 1):
                return (f"its padding along spatial axis {axis} ({begin}, {end}) is longer than its window "
                        f"spans ({d * (k - 1) + 1}): a window holds padding only, where the max pooling gives -inf")
            continue
        outputs = output_size(params, axis, n)
        if outputs < 1:
            return (f"its output is empty along spatial axis {axis} (its window spans {d * (k - 1) + 1}, the padded "
                    f"input {n + begin + end}): nothing a convolution could compute")
        for o in range(outputs):
            if not any(0 <= o * s - begin + i * d < n for i in range(k)):
                return (f"at its input size ({n} along spatial axis {axis}) its window {o} holds padding only, "
                        "where the max pooling gives -inf and no convolution can")
    return None


def _output_reason(site: PoolSite, out: ValueInfo) -> str | None:
    """Why the convolution's output size would differ from the one ONNX inferred, or None."""
    for axis, n in enumerate(site.spatial):
        inferred = out.dim(2 + axis)
        if n is None or inferred is None:
            continue
        ours = output_size(site.params, axis, n)
        if ours != inferred:
            return (f"along spatial axis {axis} its output is {inferred} long as ONNX infers it, {ours} as convify "
                    "computes it; report this model to convify")
    return None
