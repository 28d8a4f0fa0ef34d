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
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from convify.core.report import Pass, Reconstruction, Report, attach, report
from convify.core.rewrites.maxpool import PoolRecord
from convify.errors import RewriteError, UsageError
from convify.fx import copying, ops
from convify.fx.inputs import output_tensor, to_model
from convify.progress import terminal_bar
from convify.recovery.calibration import calibration_batches
from convify.recovery.fit import Enough, PoolSite, batch_input, in_forward_order, pool_sites, run_batch

#: Adam steps per block when ``steps`` is not given.
STEPS = 500
#: Adam's learning rate when ``lr`` is not given.
LR = 1e-3


@dataclass
class _Block:
    """One site's block: where it starts, where it ends and what it trains.

    The end is the output of call ``module_call`` of leaf module ``module``
    (the last spatial map, compared with the same module's output in the
    original), or the model's output when there is no such map.
    """

    site: PoolSite
    module: str | None = None
    module_call: int = 0
    toward: str = "the original model's output"
    parameters: list[nn.Parameter] = dataclasses.field(default_factory=list)
    modules: tuple[str, ...] = ()
    batchnorms: tuple[str, ...] = ()


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
    if not sites:
        raise UsageError("reconstruct: no max pooling of this model became a convolution (a fold adds no "
                         "weights to train); nothing to reconstruct")
    batches = _batches(original, done, calibration)
    sites = in_forward_order(rewritten, sites, batches, "reconstruct")
    blocks = _blocks(original, rewritten, sites, batches[0])
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
    passes = list(rep.passes)
    passes[index] = dataclasses.replace(done, replaced=rows)
    attach(rewritten, dataclasses.replace(rep, passes=tuple(passes)))
    return rewritten


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


def _blocks(original: nn.Module, model: nn.Module, sites: list[PoolSite], batch: Any) -> list[_Block]:
    """One block per site, each ending at the last spatial map after it (see :func:`_last_map`)."""
    blocks = []
    for site in sites:
        block = _Block(site)
        found = _last_map(original, model, site, batch)
        if found is not None:
            block.module, block.module_call = found
            call = f" (call {found[1] + 1})" if found[1] else ""
            block.toward = f"the original's output of {found[0]}{call}"
        blocks.append(block)
    return blocks


def _last_map(original: nn.Module, model: nn.Module, site: PoolSite, batch: Any) -> tuple[str, int] | None:
    """The last leaf module call after ``site`` whose output is a spatial map (the class-score map before a
    global pooling, the last block's output before the head) and that the original has under the same name.

    Matching a map instead of the logits gives the last block many targets per image, not one per class,
    so that a thousand calibration images do not overfit the layers after the last site."""
    started = [False]
    calls: dict[str, int] = {}
    found: list[tuple[str, int]] = []

    def start(_m: nn.Module, _args: tuple) -> None:
        started[0] = True

    def seen(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            k = calls.get(name, 0)
            calls[name] = k + 1
            # requires_grad: only the site's weight does, so this output depends on the site
            if (started[0] and isinstance(out, torch.Tensor) and out.requires_grad and out.dim() >= 3
                    and math.prod(out.shape[2:]) > 1):
                found.append((name, k))
        return hook

    originals = dict(original.named_modules())
    leaves = [(n, m) for n, m in model.named_modules()
              if n and not any(True for _ in m.children()) and type(originals.get(n)) is type(m)]
    handles = [site.conv.register_forward_pre_hook(start)]
    handles += [m.register_forward_hook(seen(n)) for n, m in leaves]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(p is site.conv.weight)
        with torch.enable_grad(), copying.eval_mode(model):
            run_batch(model, batch, "reconstruct")
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return found[-1] if found else None


# --------------------------------------------------------------------------- running a block


class _Forward:
    """Runs ``model`` on a batch and stops at the block's end; returns the activation there.

    On the rewritten model the block's start is detached from upstream (only
    the block trains); on the original (``original=True``, which has no site
    convolution) the run only stops at the end."""

    def __init__(self, model: nn.Module, block: _Block, *, original: bool = False) -> None:
        self.model, self.block, self.original = model, block, original
        self.out: torch.Tensor | None = None
        self.calls = 0

    def __enter__(self) -> "_Forward":
        self.handles = []
        if not self.original:
            start = self.block.site.conv
            self.handles.append(start.register_forward_pre_hook(lambda _m, args: (args[0].detach(), *args[1:])))
        if self.block.module is not None:
            self.handles.append(self.model.get_submodule(self.block.module).register_forward_hook(self._module_output))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _module_output(self, _m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        if self.calls == self.block.module_call:
            self.out = out
            raise Enough
        self.calls += 1

    def __call__(self, batch: Any) -> torch.Tensor:
        self.out, self.calls = None, 0
        x = to_model(self.model, batch_input(batch))
        try:
            y = self.model(x)
        except Enough:
            y = self.out
        if self.block.module is not None and self.out is None:
            if self.original:
                raise RewriteError(f"reconstruct at {self.block.site.row.name!r}: the original ran "
                                   f"{self.block.module!r} {self.calls} times on a calibration batch, where the "
                                   f"first batch reached call {self.block.module_call + 1}; pass batches that "
                                   "run the whole model")
            raise RewriteError(f"reconstruct: a calibration batch never reached {self.block.toward} after "
                               f"{self.block.site.row.name!r}; pass batches that run the whole model")
        return _tensor(y)


def _tensor(output: Any) -> torch.Tensor:
    """The activation a block is compared on: a tensor, or the logits of a model output."""
    found = output_tensor(output)
    if found is None:
        raise RewriteError(f"reconstruct: the model returned {type(output).__name__}; reconstruct compares the "
                           "last block on a tensor output (or one with .logits)")
    return found


def _targets(original: nn.Module, block: _Block, batches: Sequence[Any]) -> list[torch.Tensor]:
    """The original's activation at the block's end, per batch."""
    with torch.no_grad(), copying.eval_mode(original), _Forward(original, block, original=True) as forward:
        return [forward(batch).detach().clone() for batch in batches]


def _errors(model: nn.Module, block: _Block, batches: Sequence[Any], targets: list[torch.Tensor]) -> float:
    """RMS relative error at the block's end over the calibration data."""
    sse = total = 0.0
    with torch.no_grad(), _Forward(model, block) as forward:
        for batch, t in zip(batches, targets):
            y = forward(batch).float()
            t = t.to(y)
            if y.shape != t.shape:
                raise RewriteError(f"reconstruct at {block.site.row.name!r}: the rewritten model gives shape "
                                   f"{list(y.shape)} at the block's end ({block.toward}), the original "
                                   f"{list(t.shape)}")
            sse += float((y - t).pow(2).sum())
            total += float(t.pow(2).sum())
    return math.sqrt(sse / max(total, 1e-30))


def _find_block(model: nn.Module, block: _Block, batch: Any) -> None:
    """Fill in the block's parameters (those the end depends on, through the
    start's new convolution) and the modules and BatchNorms it covers."""
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    order: list[str] = []
    modules = dict(model.named_modules())
    started = [False]

    def started_hook(_m: nn.Module, _args: tuple) -> None:
        started[0] = True

    def seen(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _args: tuple) -> None:
            if started[0]:
                order.append(name)
        return hook

    handles = [block.site.conv.register_forward_pre_hook(started_hook)]
    handles += [m.register_forward_pre_hook(seen(n)) for n, m in modules.items() if isinstance(m, ops.BATCH_NORM)]
    try:
        with copying.eval_mode(model), _Forward(model, block) as forward:
            forward(batch).float().pow(2).sum().backward()
    finally:
        for h in handles:
            h.remove()
    block.parameters = [p for p in model.parameters() if p.grad is not None]
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    if not any(p is block.site.conv.weight for p in block.parameters):
        raise RewriteError(f"reconstruct at {block.site.row.name!r}: the block's end does not depend on the "
                           "site's new convolution; please report this as a convify bug")
    owners = {names[id(p)].rpartition(".")[0] for p in block.parameters}
    block.modules = tuple(sorted(owners))
    # a BatchNorm that the block runs, in forward order, once each (a shared one keeps its statistics)
    block.batchnorms = tuple(n for n in dict.fromkeys(order) if order.count(n) == 1)


# --------------------------------------------------------------------------- BatchNorm re-estimation


def _bn_input(model: nn.Module, bn: nn.Module, batch: Any) -> torch.Tensor | None:
    """The input of ``bn``'s first call on ``batch``, as ``(C, N*H*W)`` float64."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())
        raise Enough

    handle = bn.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), copying.eval_mode(model):
            run_batch(model, batch, "reconstruct")
    finally:
        handle.remove()
    if not seen:
        return None
    x = seen[0]
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


def _reestimate(original: nn.Module, model: nn.Module, names: Sequence[str], batches: Sequence[Any]) -> list[str]:
    """Re-estimate each BatchNorm's running statistics for its drifted input, in forward order.

    Per channel, the rewritten input ``r`` is regressed on the original's
    input ``o`` over the calibration data (``o ~ a r + b``, least squares);
    the statistics become those that normalize ``r`` as the original's
    normalized ``a r + b``: ``mean' = (mean - b) / a``, ``var' + eps = (var +
    eps) / a^2``. An unchanged input gives ``a = 1, b = 0``: the statistics stay
    exactly as they were. Where the two are not positively correlated
    (``a <= 0``), only the means are matched (``a = 1``).
    """
    moved = []
    for name in names:
        try:
            reference = original.get_submodule(name)
        except AttributeError:
            continue
        bn = model.get_submodule(name)
        if not isinstance(reference, ops.BATCH_NORM) or bn.running_mean is None or reference.running_mean is None:
            continue
        sums = None
        for batch in batches:
            o, r = _bn_input(original, reference, batch), _bn_input(model, bn, batch)
            if o is None or r is None or o.shape != r.shape:
                sums = None
                break
            moments = torch.stack([r.sum(1), o.sum(1), (r * r).sum(1), (r * o).sum(1)])
            sums = (moments, o.shape[1]) if sums is None else (sums[0] + moments, sums[1] + o.shape[1])
        if sums is None:
            continue
        sr, so, srr, sro = sums[0] / sums[1]
        var_r, cov = srr - sr * sr, sro - sr * so
        slope = torch.where((var_r > 1e-12) & (cov > 0), cov / var_r.clamp_min(1e-12), torch.ones_like(cov))
        offset = so - slope * sr
        with torch.no_grad():
            mean, var = bn.running_mean.double(), bn.running_var.double()
            bn.running_mean.copy_(((mean - offset) / slope).to(bn.running_mean))
            bn.running_var.copy_(((var + bn.eps) / slope.pow(2) - bn.eps).clamp_min(0).to(bn.running_var))
        moved.append(name)
    return moved


# --------------------------------------------------------------------------- training a block


def _reconstruct_block(original: nn.Module, model: nn.Module, block: _Block, batches: Sequence[Any], steps: int,
                       lr: float, progress: bool) -> Reconstruction:
    _find_block(model, block, batches[0])
    targets = _targets(original, block, batches)
    initial = _errors(model, block, batches, targets)
    before = _state(model)
    moved = _reestimate(original, model, block.batchnorms, batches)
    reestimated = _errors(model, block, batches, targets)
    after, reverted = reestimated, ""
    if steps:
        reestimated_state = _state(model)
        _train(model, block, batches, targets, steps, lr, progress)
        after = _errors(model, block, batches, targets)
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


def _train(model: nn.Module, block: _Block, batches: Sequence[Any], targets: list[torch.Tensor], steps: int,
           lr: float, progress: bool) -> None:
    for p in block.parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(block.parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    try:
        with copying.eval_mode(model), _Forward(model, block) as forward, \
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
