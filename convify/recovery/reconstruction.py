"""``convify.reconstruct``: give a rewritten model the original's activations back, from unlabeled images.

``init="fit"`` sets each new convolution alone, by least squares toward the
pooling it replaced. Reconstruction goes one step further, the way
post-training quantization reconstructs blocks (AdaRound, BRECQ): the sites
are taken in forward order, and each site's *block* -- its new convolution
and every layer after it up to the last spatial map of the network (the
class-score map before global pooling, or the last feature map before the
head; the model's output when there is none) -- is trained with Adam to
reproduce the original model's activation there:

* why that boundary: the layers between two sites cannot reproduce a max
  pooling's non-linearity at the next site's input (on a converged Model C
  the relative error there stays above 0.3 however long they train), while
  the layers up to the last map can compensate for it; and a map gives many
  targets per image where the logits give one per class, so a thousand
  calibration images do not overfit (``benchmarks/RESULTS.md``, recovery);
* each block reads the rewritten model's own upstream activations (earlier
  sites already reconstructed), so it also absorbs their drift;
* the loss is the relative squared error ``||y - t||^2 / ||t||^2`` of each
  batch; every layer outside the block is frozen, the model runs in eval mode
  (BatchNorm normalizes with its running statistics, dropout is off), and
  only the block's parameters (found by autograd: those the block's output
  depends on) receive gradients;
* before training a block, the running statistics of its BatchNorms are
  re-estimated on the calibration data, against the original's BatchNorm
  input on the same images: per channel, the statistics become those that
  normalize the drifted input as the original normalized its least-squares
  affine estimate of the original input. A BatchNorm whose input did not
  change keeps its statistics exactly.

The relative error at each block's end (RMS over the calibration data) before
anything, after the BatchNorm re-estimation and after training goes into the
report (``Replaced.reconstruction``). A block that training leaves worse than
it found it gets its weights back (the report says so). No labels are used.

>>> allconv = convify.replace_maxpool(model, init="fit", calibration=batches)
>>> convify.reconstruct(model, allconv, batches)
>>> print(convify.report(allconv))   # ... reconstruction error 0.21 -> 0.04 (BatchNorm re-estimated: 0.15) ...
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from convify.core.report import Pass, Reconstruction, Replaced, Report, attach, report
from convify.core.rewrites.maxpool import PoolRecord
from convify.errors import UsageError
from convify.fx import copying
from convify.progress import terminal_bar
from convify.recovery.batchnorm_reestimation import reestimate_batchnorms
from convify.recovery.blocks import Block, BlockForward, block_error, block_targets, find_blocks, trace_block
from convify.recovery.calibration import batch_input, calibration_batches, in_forward_order, pool_sites

#: Adam steps per block when ``steps`` is not given.
STEPS = 500
#: Adam's learning rate when ``lr`` is not given.
LR = 1e-3


def reconstruct(original: nn.Module, rewritten: nn.Module, calibration: Iterable[Any] | str, *,
                steps: int | None = None, lr: float | None = None, progress: bool = True) -> nn.Module:
    """Train each max-pool site's block of ``rewritten`` to reproduce ``original``'s activations, in place.

    Args:
        original: the model before the rewrite (left unchanged).
        rewritten: what :func:`convify.replace_maxpool` (or :func:`convify.convify`)
            made of it, typically with ``init="fit"``; changed in place and returned.
        calibration: unlabeled input batches (tensors, or ``(input, label)``
            pairs whose labels are ignored), each Adam step taking the next
            batch in turn; or ``"synthetic"``: images synthesized to match the
            original's BatchNorm statistics (see :func:`convify.synthetic.synthesize`).
            A thousand images are usually enough.
        steps: Adam steps per block (default 500), one calibration batch each.
        lr: Adam's learning rate (default 1e-3), decayed along a half cosine.
        progress: a progress bar per block (tqdm, when installed and stderr is a terminal).

    Returns ``rewritten``, whose report now carries each site's
    :class:`~convify.report.Reconstruction`.

    >>> batches = [x for x, _ in itertools.islice(loader, 16)]
    >>> allconv = convify.replace_maxpool(model, init="fit", calibration=batches)
    >>> convify.reconstruct(model, allconv, batches)
    """
    steps = STEPS if steps is None else int(steps)
    lr = LR if lr is None else float(lr)
    if steps < 0:
        raise UsageError(f"reconstruct: steps={steps}; pass a number of Adam steps >= 0")
    if not lr > 0:
        raise UsageError(f"reconstruct: lr={lr}; pass a positive learning rate")
    rep = report(rewritten)
    index, done = _maxpool_pass(rep, rewritten)
    sites = pool_sites(rewritten, done)
    exact = {r.name for r in done.replaced if isinstance(r.detail, PoolRecord) and r.detail.exact}
    if not sites and not exact:
        raise UsageError("reconstruct: no max pooling of this model became a convolution (a fold adds no "
                         "weights to train); nothing to reconstruct")
    if not sites:  # every site is exact: the model already computes the original's function there
        return _attach(rewritten, rep, index, _with_exact_notes(done.replaced, exact))
    batches = _batches(original, done, calibration)
    sites = in_forward_order(rewritten, sites, batches, "reconstruct")
    blocks = find_blocks(original, rewritten, sites, batches[0])
    results: dict[str, Reconstruction] = {}
    flags = {p: p.requires_grad for p in rewritten.parameters()}
    try:
        for block in blocks:
            results[block.site.row.name] = _reconstruct_block(original, rewritten, block, batches, steps, lr,
                                                              progress)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    rows = tuple(dataclasses.replace(r, reconstruction=results[r.name]) if r.name in results else r
                 for r in done.replaced)
    return _attach(rewritten, rep, index, _with_exact_notes(rows, exact))


EXACT_NOTE = "exact (mode='exact'): it computes the original's max pooling; nothing to reconstruct"


def _with_exact_notes(rows: Sequence[Replaced], exact: set[str]) -> tuple[Replaced, ...]:
    return tuple(dataclasses.replace(r, notes=r.notes + (EXACT_NOTE,)) if r.name in exact and EXACT_NOTE not in
                 r.notes else r for r in rows)


def _attach(model: nn.Module, rep: Report, index: int, rows: tuple[Replaced, ...]) -> nn.Module:
    passes = list(rep.passes)
    passes[index] = dataclasses.replace(passes[index], replaced=rows)
    attach(model, dataclasses.replace(rep, passes=tuple(passes)))
    return model


# --------------------------------------------------------------------------- what to reconstruct


def _maxpool_pass(rep: Report, model: nn.Module) -> tuple[int, Pass]:
    """The last pass that replaced max poolings, found by its records."""
    found = [(i, p) for i, p in enumerate(rep.passes) if any(isinstance(r.detail, PoolRecord) for r in p.replaced)]
    if not found:
        raise UsageError(f"reconstruct: {type(model).__name__} has no max-pool rewrite in its convify report; "
                         "pass the model that convify.replace_maxpool (or convify.convify) returned, or one "
                         "that convify.load read back")
    return found[-1]


def _batches(original: nn.Module, done: Pass, calibration: Iterable[Any] | str) -> Sequence[Any]:
    if isinstance(calibration, str):
        from convify.recovery.synthetic import synthetic_calibration  # noqa: PLC0415

        return synthetic_calibration(original, calibration, done.input_shape, "reconstruct")
    return calibration_batches(calibration, "reconstruct")


# --------------------------------------------------------------------------- training a block


def _reconstruct_block(original: nn.Module, model: nn.Module, block: Block, batches: Sequence[Any], steps: int,
                       lr: float, progress: bool) -> Reconstruction:
    trace_block(model, block, batches[0])
    targets = block_targets(original, block, batches)
    initial = block_error(model, block, batches, targets)
    before = _state(model)
    moved = reestimate_batchnorms(original, model, block.batchnorms, batches)
    reestimated = block_error(model, block, batches, targets)
    after, reverted = reestimated, ""
    if steps:
        reestimated_state = _state(model)
        _train(model, block, batches, targets, steps, lr, progress)
        after = block_error(model, block, batches, targets)
        if after > reestimated:  # training made it worse: back to where it started
            model.load_state_dict(reestimated_state)
            after, reverted = reestimated, "training"
    if after > initial:  # the re-estimation too
        model.load_state_dict(before)
        after, reverted = initial, "training and BatchNorm re-estimation" if steps else "BatchNorm re-estimation"
    return Reconstruction(error_before=initial, error_reestimated=reestimated, error_after=after,
                          samples=sum(len(batch_input(b)) for b in batches), steps=steps, lr=lr, toward=block.toward,
                          trained=block.modules, batchnorms=tuple(moved), reverted=reverted)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(model: nn.Module, block: Block, batches: Sequence[Any], targets: list[torch.Tensor], steps: int,
           lr: float, progress: bool) -> None:
    for p in block.parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(block.parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    try:
        with copying.eval_mode(model), BlockForward(model, block) as forward, \
                terminal_bar(progress, total=steps, desc=f"reconstruct {block.site.row.name}") as bar:
            for step in range(steps):
                i = step % len(batches)
                t = targets[i]
                y = forward(batches[i]).float()
                loss = (y - t.to(y)).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-30)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
    finally:
        for p in block.parameters:
            p.requires_grad_(False)
            p.grad = None
