"""``init="fit"``: the new convolutions reproduce the max pooling they replace.

Max pooling is not linear, so no convolution computes it; this sets each new
convolution's weights by ridge-regularized least squares so that, on the
calibration activations, it comes as close to the original pooling as a linear
map can. Sites are fitted one by one in the order the forward runs them, and
the activations of site *i* come from the model whose sites *0..i-1* are
already fitted, so later sites see the earlier replacements' outputs (their
drift, not the original activations). The target of site *i* is what the
*original* model's pooling outputs at that site on the same batch (the
teacher's activation), so the fit also compensates the drift that the earlier
replacements caused upstream. The original's pooling calls are matched to the
sites by call order (a ``TorchFunctionMode`` records every max pooling call
in both models); when the calls do not line up (different counts or shapes),
or ``inplace=True`` and the original cannot be copied, the target falls back
to the original max pooling applied to the rewritten model's own input at the
site, and the report's notes say so.

Nothing is back-propagated. Per site, only the normal equations are kept
(``X^T X`` and ``X^T Y``, accumulated batch by batch from the im2col patches of
the site's input), so memory does not grow with the calibration set: a dense
``C -> C`` convolution with a ``k x k`` window needs ``(C*k*k + 1)^2`` doubles
(512 channels, 3x3: 4609^2 doubles = 170 MB), a depthwise one
``C * (k*k + 1)^2``. The solve shrinks toward the average-pooling weights, so a
small calibration set changes the average init only as far as the data
supports (:mod:`convify.recovery.least_squares`).

:func:`calibrate_pass` fits what one pass made: these pooling sites, and the
global-average heads (:mod:`convify.recovery.fit_heads`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from convify.core import weights as W
from convify.core.report import Fit, Pass
from convify.core.rewrites.head import HeadRecord
from convify.core.rewrites.maxpool import CONV, POOL_MODES, PoolRecord
from convify.errors import OptionError, RewriteError
from convify.fx import copying, ops
from convify.fx.rewrites.maxpool.same import PadSame
from convify.recovery.calibration import Enough, PoolSite, in_forward_order, pool_sites, run_batch
from convify.recovery.fit_heads import fit_gap_heads
from convify.recovery.least_squares import NormalEquations, solve_and_install, with_fit
from convify.wording import counted

#: Rows of the patch matrix handled at once (bounds the float64 working set).
_CHUNK_ELEMENTS = 1 << 24


def fit_pool_sites(teacher: nn.Module | None, model: nn.Module, done: Pass, batches: Sequence[Any], *,
                   target: str = "original") -> Pass:
    """``replace_maxpool(..., init="fit", calibration=batches)``, after the
    rewrite: fit every new convolution of ``done`` (the maxpool pass that made
    ``model``), in place; returns the pass with each fitted row's ``fit`` set.

    The sites to fit are read from the rows' typed records (a fold adds no
    weights). ``calibration`` is an iterable of input batches (tensors, or
    ``(input, label, ...)`` tuples as a DataLoader yields; the labels are not
    used), iterated once per site. A few hundred images are usually enough.

    ``target="original"`` (the default) fits each site toward ``teacher``'s
    pooling output at that site (the original model's activations; falls
    back to ``"pool"`` with a note when the calls cannot be matched);
    ``target="pool"`` toward the max pooling of the rewritten model's own
    input at the site.

    >>> batches = [x for x, _ in itertools.islice(loader, 8)]
    >>> allconv = convify.replace_maxpool(model, init="fit", calibration=batches)
    >>> print(convify.report(allconv))   # ... pool: init=fit, reconstruction error 0.08 (avg init 0.41)
    """
    sites = pool_sites(model, done)
    notes = list(done.notes)
    records = [r.detail for r in done.replaced if isinstance(r.detail, PoolRecord)]
    if any(d.exact for d in records):
        notes.append("init='fit': the exact sites compute the max pooling exactly; nothing to fit there")
    unlearned = sorted({d.mode for d in records if d.conv is None and not d.exact
                        and not POOL_MODES.get(d.mode, CONV).learned})
    for mode in unlearned:
        notes.append(f"init='fit' with mode={mode!r}: its sites add no weights to fit ({POOL_MODES[mode].help}), so "
                     "only sites that became a convolution are fitted")
    calls: dict[str, list[int]] | None = None
    why = "no original model to take the targets from" if teacher is None else ""
    if target == "original" and teacher is not None and sites:
        calls, why = _match_calls(teacher, model, sites, batches[0])
    if target == "original" and sites and calls is None:
        notes.append(f"init='fit': fitted toward max pooling of the rewritten model's own activations, not the "
                     f"original model's pooling outputs: {why}")
    fitted: dict[str, Fit | str] = {}
    for site in in_forward_order(model, sites, batches):
        fitted[site.row.name] = _fit_site(model, site, batches, teacher,
                                          (calls.get(site.row.name) or None) if calls is not None else None)
    rows = tuple(with_fit(r, fitted[r.name]) if r.name in fitted else r for r in done.replaced)
    return dataclasses.replace(done, replaced=rows, notes=tuple(dict.fromkeys(notes)))


# --------------------------------------------------------------------------- the original's activations


class _PoolCalls(TorchFunctionMode):
    """Records the output shape of every max pooling call, in call order, and
    keeps the outputs of the calls in ``keep`` (stops the forward once it has them)."""

    def __init__(self, keep: Sequence[int] = ()) -> None:
        super().__init__()
        self.keep = set(keep)
        self.shapes: list[tuple[str | None, tuple[int, ...]]] = []
        self.kept: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func not in ops.MAX_POOLING_CALLS:
            return out
        first = out[0] if isinstance(out, (tuple, list)) else out
        index = len(self.shapes)
        self.shapes.append((None, tuple(first.shape)))  # None: a max pooling, not a site
        if index in self.keep:
            self.kept[index] = first.detach().clone()  # an in-place op downstream must not change it
            if len(self.kept) == len(self.keep):
                raise Enough
        return out


def _match_calls(teacher: nn.Module, model: nn.Module, sites: list[PoolSite],
                  batch: Any) -> tuple[dict[str, list[int]] | None, str]:
    """For each site, the indices of the original's max pooling calls that its
    convolution's calls replace, by call order on one batch; ``(None, why)``
    when the two models' calls do not line up."""
    original = _PoolCalls()
    with torch.no_grad(), copying.eval_mode(teacher), original:
        run_batch(teacher, batch)
    rewritten = _PoolCalls()

    def record(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            rewritten.shapes.append((name, tuple(out.shape)))
        return hook

    handles = [s.conv.register_forward_hook(record(s.row.name)) for s in sites]
    try:
        with torch.no_grad(), copying.eval_mode(model), rewritten:
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    if len(original.shapes) != len(rewritten.shapes):
        return None, (f"the original ran {counted(len(original.shapes), 'max pooling')}, the rewritten model "
                      f"{counted(len(rewritten.shapes), 'max pooling')} and fitted convolutions together "
                      "(a folded pool runs none)")
    calls: dict[str, list[int]] = {s.row.name: [] for s in sites}
    for index, ((_, want), (name, got)) in enumerate(zip(original.shapes, rewritten.shapes)):
        if want != got:
            return None, (f"call {index + 1} gives shape {list(want)} in the original but {list(got)} in the "
                          f"rewritten model ({name or 'a max pooling'})")
        if name is not None:
            calls[name].append(index)
    return calls, ""


def _pool_outputs(teacher: nn.Module, batch: Any, indices: Sequence[int], site: str) -> list[torch.Tensor]:
    """The original's max pooling outputs at call ``indices`` on ``batch``."""
    mode = _PoolCalls(indices)
    with torch.no_grad(), copying.eval_mode(teacher), mode:
        run_batch(teacher, batch)
    if len(mode.kept) != len(indices):
        raise RewriteError(f"init='fit' at {site!r}: the original ran only "
                           f"{counted(len(mode.shapes), 'max pooling')} on a "
                           f"calibration batch, where the first batch needed call {max(indices) + 1}; "
                           "for models whose pooling calls depend on the input, fit toward max pooling of "
                           "the rewritten activations: replace_maxpool(..., init='fit', fit_target='pool')")
    return [mode.kept[i] for i in indices]



def _fit_site(model: nn.Module, site: PoolSite, batches: Sequence[Any], teacher: nn.Module | None = None,
              calls: Sequence[int] | None = None) -> Fit | str:
    """Accumulate the site's normal equations over the calibration batches,
    solve, install the weights; returns the report note. With ``teacher`` and
    ``calls`` (the original's pooling calls this site replaces), the targets
    are the teacher's outputs of those calls; else the max pooling of the
    site's own input."""
    normal = NormalEquations()
    depthwise = site.conv.groups > 1
    targets: list[torch.Tensor] = []
    seen = [0]
    last_pad: list[tuple[torch.Tensor, torch.Tensor]] = []  # (output, input) of the latest PadSame call

    def pad_hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        last_pad[:] = [(out, args[0])]

    def hook(_m: nn.Module, args: tuple) -> None:
        if calls is None:
            _accumulate(normal, site, args[0], depthwise, unpadded=_unpadded(site, args[0], last_pad))
            return
        _accumulate(normal, site, args[0], depthwise, targets[seen[0]])
        seen[0] += 1
        if seen[0] == len(targets):
            raise Enough  # nothing after the site's last call matters for its fit

    handles = [site.conv.register_forward_pre_hook(hook)]
    if site.params.same and calls is None:  # the target pools the input before its PadSame
        handles += [m.register_forward_hook(pad_hook) for m in model.modules() if isinstance(m, PadSame)]
    try:
        with torch.no_grad(), copying.eval_mode(model):
            for batch in batches:
                if calls:
                    targets[:] = _pool_outputs(teacher, batch, calls, site.row.name)
                    seen[0] = 0
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    if normal.gram is None:
        return "init=fit skipped: the calibration batches never reached this site; kept the average init"
    toward = "the original model's pooling output" if calls else "max pooling of its input"
    return solve_and_install(site.conv, normal, depthwise, start="avg init", toward=toward)


def _unpadded(site: PoolSite, x: torch.Tensor, last_pad: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> torch.Tensor | None:
    """For a "same" site, the input of the ``PadSame`` whose output ``x`` is
    (the rewrite puts it right before the convolution); None for other sites."""
    if not site.params.same:
        return None
    if not last_pad or last_pad[0][0] is not x:
        raise RewriteError(f"init='fit' at {site.row.name!r}: the input of its convolution does not come from "
                           "the PadSame the rewrite put before it; fit toward the original model's pooling "
                           "outputs instead: replace_maxpool(..., init='fit', fit_target='original')")
    return last_pad[0][1]


def _accumulate(normal: NormalEquations, site: PoolSite, x: torch.Tensor, depthwise: bool,
                target: torch.Tensor | None = None, unpadded: torch.Tensor | None = None) -> None:
    """Add one batch arriving at the site's convolution to its normal equations
    (``target``: what the convolution should output; default: max pooling of
    the site's input, which is ``unpadded`` for a "same" site, whose
    convolution reads it zero-padded where the pooling padded with -inf)."""
    p = site.params
    conv = site.conv
    if target is None:
        if p.same:
            source = unpadded
        else:
            # The rewrite pads ceil_mode's extra windows with zeros before the conv;
            # the original pooling saw the input without them.
            extra = p.extra_pad
            source = x[(..., *(slice(0, n - e) for n, e in zip(x.shape[2:], extra)))] if any(extra) else x
        target = p.pool(source)
    channels = x.shape[1]
    target = target.movedim(1, -1).reshape(-1, channels)
    rows = W.patches(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if rows.shape[0] != target.shape[0]:
        raise RewriteError(f"init='fit' at {site.row.name!r}: the convolution reads {counted(rows.shape[0], 'window')} "
                           f"where the pooling gives {counted(target.shape[0], 'output')}")
    device = torch.device("cpu") if x.device.type == "mps" else x.device  # no float64 on MPS
    chunk = max(1, _CHUNK_ELEMENTS // (rows.shape[1] * (rows.shape[2] + 1)))
    for start in range(0, rows.shape[0], chunk):
        r = rows[start:start + chunk].to(device=device, dtype=torch.float64)
        y = target[start:start + chunk].to(device=device, dtype=torch.float64)
        ones = torch.ones(r.shape[0], 1, dtype=r.dtype, device=device)
        if depthwise:  # per channel: (C, M, K+1) features, (C, M, 1) targets
            feats = torch.cat([r.transpose(0, 1), ones.expand(channels, -1, -1)], dim=-1)
            gram = feats.transpose(1, 2) @ feats
            cross = feats.transpose(1, 2) @ y.T.unsqueeze(-1)
            sq = (y * y).sum(0)
        else:  # (M, C*K+1) features, (M, C) targets
            feats = torch.cat([r.reshape(r.shape[0], -1), ones], dim=1)
            gram = feats.T @ feats
            cross = feats.T @ y
            sq = (y * y).sum()
        normal.add(gram, cross, sq, samples=0)
    normal.samples += x.shape[0]


# --------------------------------------------------------------------------- one pass

#: What ``init="fit"`` fits each pooling site toward (``replace_maxpool(fit_target=...)``).
FIT_TARGETS = ("original", "pool")


def check_fit_target(target: str) -> None:
    if target not in FIT_TARGETS:
        raise OptionError(f"maxpool: fit_target must be one of {FIT_TARGETS}, not {target!r}")


def calibrate_pass(teacher: nn.Module | None, model: nn.Module, done: Pass, batches: Sequence[Any], *,
                   fit_target: str = "original") -> Pass:
    """Fit, in place, what calibration data can fit among the sites of one
    pass, chosen by their typed records (never by the rewrite's name): each
    new pooling convolution (:class:`PoolRecord` with a ``conv``) toward the
    original's pooling, each global-average head that is not exact
    (:class:`HeadRecord`) toward the original's logits. Returns the pass with
    the rows' ``fit`` set."""
    check_fit_target(fit_target)
    if any(isinstance(r.detail, PoolRecord) for r in done.replaced):
        done = fit_pool_sites(teacher, model, done, batches, target=fit_target)
    if any(isinstance(r.detail, HeadRecord) for r in done.replaced):
        done = fit_gap_heads(teacher, model, done, batches)
    return done
