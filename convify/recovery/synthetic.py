"""``calibration="synthetic"``: calibration images made from a trained model's BatchNorm statistics.

A user who has the trained model but none of its data still has, in every
BatchNorm, the per-channel mean and variance that the training images produced
at that layer. Images whose activations reproduce those statistics stand in
for real calibration data (ZeroQ, Cai et al. 2020; DeepInversion, Yin et al.
2020): starting from noise, Adam changes the *input* to minimize, over every
BatchNorm of the frozen model,

    ||mean(x_l) - running_mean_l|| + ||std(x_l) - sqrt(running_var_l)||

(the first BatchNorm counted ``FIRST_LAYER`` times, as DeepInversion does),
plus a cross-entropy toward a class assigned to each image (classes in turn,
so that every class is represented), a total-variation prior for smooth
images and a small L2 prior. ``init="fit"`` and :func:`convify.reconstruct`
then fit toward the original's activations on these images.

>>> allconv = convify.replace_maxpool(model, init="fit", calibration="synthetic")
>>> convify.reconstruct(model, allconv, "synthetic")   # the same images, made once per model
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from convify.errors import UsageError
from convify.fx import copying, ops
from convify.fx.inputs import output_tensor
from convify.recovery import SYNTHETIC

#: The word that asks for synthetic calibration data.
#: Weight of the first BatchNorm's statistics (its input is closest to the image).
FIRST_LAYER = 10.0


@dataclass(frozen=True)
class SynthesisOptions:
    """How many images and how hard to work on them."""

    count: int = 256
    batch_size: int = 128
    steps: int = 300
    lr: float = 0.1
    classes: float = 0.5    # weight of the cross-entropy toward each image's class
    smoothness: float = 1e-3  # total variation
    l2: float = 1e-5
    seed: int = 0


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, list[torch.Tensor]]]" = weakref.WeakKeyDictionary()


def synthetic_calibration(model: nn.Module, word: str, input_shape: Sequence[int] | None, who: str,
                          options: SynthesisOptions | None = None) -> list[torch.Tensor]:
    """The batches for ``calibration=word``: synthesized from ``model``'s BatchNorms at ``input_shape``
    (one sample's shape, batch dimension first), made once per model and reused while its weights do not change."""
    if word != SYNTHETIC:
        raise UsageError(f"{who}: calibration={word!r}; pass input batches (a list of tensors or a DataLoader) "
                         f"or calibration={SYNTHETIC!r} to synthesize them from the model's BatchNorm statistics")
    if input_shape is None:
        raise UsageError(f"{who}: calibration={SYNTHETIC!r} needs the input's shape; pass example_input")
    options = options or SynthesisOptions()
    key = (tuple(input_shape[1:]), options, _fingerprint(model))
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    batches = synthesize(model, tuple(input_shape[1:]), options, who=who)
    _CACHE[model] = (key, batches)
    return batches


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced or modified in place."""
    return tuple((t.data_ptr(), t._version) for t in [*model.parameters(), *model.buffers()])


def synthesize(model: nn.Module, sample_shape: Sequence[int], options: SynthesisOptions | None = None, *,
               who: str = "synthesize") -> list[torch.Tensor]:
    """``options.count`` inputs of shape ``sample_shape`` (no batch dimension) whose BatchNorm input
    statistics in ``model`` match its running statistics, in batches of ``options.batch_size``.

    >>> batches = synthesize(model, (3, 32, 32))
    """
    options = options or SynthesisOptions()
    norms = [m for m in model.modules() if isinstance(m, ops.BATCH_NORM) and m.running_mean is not None]
    if not norms:
        raise UsageError(f"{who}: calibration={SYNTHETIC!r} needs BatchNorm layers with running statistics "
                         f"(they are what the images are made to match); {type(model).__name__} has none: "
                         "pass real input batches as calibration=")
    param = next(iter(model.parameters()))
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    batches = []
    for start in range(0, options.count, options.batch_size):
        n = min(options.batch_size, options.count - start)
        x = torch.randn(n, *sample_shape, generator=generator).to(param.device, param.dtype)
        labels = torch.arange(start, start + n, device=param.device)
        batches.append(_optimize(model, norms, x, labels, options))
    return batches


def _optimize(model: nn.Module, norms: list[nn.Module], x: torch.Tensor, labels: torch.Tensor,
              options: SynthesisOptions) -> torch.Tensor:
    losses: list[torch.Tensor] = []

    def hook(first: bool):  # noqa: ANN202
        def record(bn: nn.Module, args: tuple) -> None:
            a = args[0]
            dims = [d for d in range(a.dim()) if d != 1]
            mean, var = a.mean(dims), a.var(dims, unbiased=False)
            loss = (torch.linalg.vector_norm(mean - bn.running_mean)
                    + torch.linalg.vector_norm(var.add(bn.eps).sqrt() - bn.running_var.add(bn.eps).sqrt()))
            losses.append(loss * (FIRST_LAYER if first else 1.0))
        return record

    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [bn.register_forward_pre_hook(hook(i == 0)) for i, bn in enumerate(norms)]
    x = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=options.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(options.steps, 1))))
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with copying.eval_mode(model):
            for _ in range(options.steps):
                losses.clear()
                out = output_tensor(model(x))
                loss = torch.stack(losses).sum()
                if out is not None and out.dim() == 2 and options.classes:
                    loss = loss + options.classes * F.cross_entropy(out, labels % out.shape[1])
                if x.dim() == 4 and options.smoothness:
                    loss = loss + options.smoothness * _total_variation(x)
                loss = loss + options.l2 * x.pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return x.detach()


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean())
