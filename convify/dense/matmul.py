"""Opt-in: a converted head's convolutions run as one matrix multiply on CPU.

``replace_linear_head`` builds standard ``nn.Conv2d`` modules, so what runs
eagerly is what is exported, verified and checkpointed. On CPU, though,
oneDNN's direct convolution is slow on a head's shapes (a kernel as large as
the map it reads, a 1x1 kernel over thousands of channels, few positions):
:func:`matmul_heads` swaps those convolutions for :class:`MatmulConv2d`,
which computes the same sums as ``unfold`` plus one GEMM, the GEMM the Linear
ran before.

>>> fcn = convify.replace_linear_head(alexnet, torch.randn(1, 3, 224, 224), dense=True)
>>> fast = convify.matmul_heads(fcn)     # same state_dict, same outputs; eager CPU runs GEMMs
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from convify.core.report import report
from convify.core.rewrites.head import SPEC as HEAD
from convify.core.rewrites.head import HeadRecord
from convify.errors import UsageError

#: From this many output positions on, a GEMM per image is as fast as one over all positions.
_MIN_POSITIONS = 16


def matmul_heads(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with the 2-D convolutions of its converted heads replaced by
    :class:`MatmulConv2d`: same parameters and state_dict keys, same outputs
    (to float rounding), faster eager execution on CPU.

    The heads are the ones ``model``'s convify report lists (each row's
    :class:`~convify.rewrites.head.HeadRecord` names its modules), so
    ``model`` must come from ``replace_linear_head``, ``convify`` or ``load``.
    Heads of 1-D and 3-D models stay as they are. Works on a copy unless
    ``inplace=True``. The state_dict does not change, so a checkpoint saved
    from either model is the same; ``convify.load`` rebuilds plain heads
    (call this again after loading).

    When it is faster (eager PyTorch on CPU; ``benchmarks/dense.py``, whose
    tables are in ``benchmarks/RESULTS.md``, torch 2.14, 1-2 threads):

    * a flatten head's first layer (AlexNet's 6x6, VGG's 7x7 kernel over a
      map of that size): 10-11x at batch 1, 2.6-2.8x at batch 64, 3x in a
      dense pass over a 451x451 image; whole models at 224x224, batch 1: the
      plain heads cost 1.4-3.8x the original Linear model, these heads 1.0x;
      dense AlexNet and VGG-11 passes run 1.35-1.8x faster;
    * 1x1 layers: 2.5x at batch 64, 1.06-3x over 4096 channels on an 8x8
      map; about even (0.83-1.16x) at batch 1 and for a 512 -> 1000 layer
      over 8 images of 14x14;
    * never on the body: a GEMM over ``unfold`` is 3x slower than oneDNN on
      a 3x3 convolution over a 56x56 map, so only the heads are swapped.

    What stays plain: on other devices, and whenever the model is exported
    (ONNX, ``torch.export``), compiled, scripted, traced by torch.jit or by
    torch.fx, :class:`MatmulConv2d` runs ``nn.Conv2d.forward``; so
    ``export_onnx`` and ``verify`` see a ``Conv`` exactly as without this
    function, and ``verify`` compares that Conv with the eager GEMM.

    >>> fast = convify.matmul_heads(convify.replace_linear_head(vgg, x))
    >>> type(fast.classifier[0]).__name__
    'MatmulConv2d'
    """
    passes = [p for p in report(model).passes if p.rewrite == HEAD.name]
    if not passes:
        raise UsageError(f"{type(model).__name__} has no convify report of a head rewrite: matmul_heads finds "
                         "the head's convolutions in it; pass the model replace_linear_head, convify or load "
                         "returned")
    out = model if inplace else copy.deepcopy(model)
    swapped: dict[int, MatmulConv2d] = {}  # one module registered under two names stays one module
    records = [row.detail for p in passes for row in p.replaced if isinstance(row.detail, HeadRecord)]
    for name in (n for record in records for n in record.linears):
        try:
            conv = out.get_submodule(name)
        except AttributeError as e:
            raise UsageError(f"the report names head module {name!r}, which {type(model).__name__} no longer "
                             "has; was the model changed after its rewrite?") from e
        if type(conv) is not nn.Conv2d:
            continue  # the convolution of a 1-D or 3-D head, or one already swapped
        if id(conv) not in swapped:
            swapped[id(conv)] = MatmulConv2d.from_conv(conv)
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, swapped[id(conv)])
    return out


class MatmulConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose eager CPU forward is ``unfold`` and one GEMM.

    Same parameters, buffers and state_dict as the ``nn.Conv2d`` it replaces;
    only ``forward`` differs, and only where it computes: eager, on CPU, for
    a real ``torch.Tensor``, with zero padding and ``groups=1``. Everywhere
    else it is ``nn.Conv2d.forward``, so that what is exported or compiled is
    a plain convolution. The checks, one per way of capturing a model:

    * ``torch.jit.is_scripting()`` / ``torch.jit.is_tracing()``: TorchScript;
    * ``torch.onnx.is_in_onnx_export()``: the legacy ONNX exporter;
    * ``torch.compiler.is_compiling()``: ``torch.compile`` and ``torch.export``
      (dynamo, hence the dynamo ONNX exporter);
    * the input is not exactly a ``torch.Tensor``: a torch.fx ``Proxy``, a
      fake or functional tensor of an exporter; or it is not on the CPU.

    ``convify_leaf = True``: convify's tracer keeps it as one module call, so
    a model with it retraces to the graph it had (a later rewrite, ``verify``).
    """

    convify_leaf = True

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "MatmulConv2d":
        """A ``MatmulConv2d`` holding ``conv``'s own parameters (not copies)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_convolution_wanted(x) or self.padding_mode != "zeros" or self.groups != 1:
            return super().forward(x)
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _plain_convolution_wanted(x: torch.Tensor) -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    if torch.compiler.is_compiling():
        return True
    return type(x) is not torch.Tensor or x.device.type != "cpu"


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, ...] = (1, 1), padding: Any = (0, 0),
                     dilation: tuple[int, ...] = (1, 1)) -> torch.Tensor:
    """``F.conv2d`` (groups=1) as ``unfold`` and one ``(N*L, C*k*k) @ (C*k*k, K)`` GEMM."""
    n, _, h, w = x.shape
    k, c, kh, kw = weight.shape
    if isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    positions = out_h * out_w
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and not any(padding):
        cols = x.reshape(n, c, positions)
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    flat_weight = weight.reshape(k, -1)
    if n == 1 or positions >= _MIN_POSITIONS:
        # channel-major (K, F) @ (F, L) per image: the result is already (N, K, H', W'), no copies
        if n == 1:
            out = flat_weight @ cols[0] if bias is None else torch.addmm(bias[:, None], flat_weight, cols[0])
            return out.view(1, k, out_h, out_w)
        out = flat_weight @ cols
        return (out if bias is None else out + bias[:, None]).view(n, k, out_h, out_w)
    # few positions, many images (the native size): one (N*L, F) @ (F, K) GEMM, the Linear's own
    rows = cols.transpose(1, 2).reshape(n * positions, -1)
    out = rows @ flat_weight.t() if bias is None else torch.addmm(bias, rows, flat_weight.t())
    return out.view(n, out_h, out_w, k).permute(0, 3, 1, 2).contiguous()
