"""A reconstruction block: a pooling site's new convolution and every layer after it up to the last spatial
map, found on one batch; running the model to the block's end, and the error there."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from convify.errors import RewriteError
from convify.fx import copying, ops
from convify.fx.inputs import output_tensor, to_model
from convify.recovery.calibration import Enough, PoolSite, batch_input, run_batch


@dataclass
class Block:
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


def find_blocks(original: nn.Module, model: nn.Module, sites: list[PoolSite], batch: Any) -> list[Block]:
    """One block per site, each ending at the last spatial map after it (see :func:`_last_map`)."""
    blocks = []
    for site in sites:
        block = Block(site)
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


class BlockForward:
    """Runs ``model`` on a batch and stops at the block's end; returns the activation there.

    On the rewritten model the block's start is detached from upstream (only
    the block trains); on the original (``original=True``, which has no site
    convolution) the run only stops at the end."""

    def __init__(self, model: nn.Module, block: Block, *, original: bool = False) -> None:
        self.model, self.block, self.original = model, block, original
        self.out: torch.Tensor | None = None
        self.calls = 0

    def __enter__(self) -> "BlockForward":
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


def block_targets(original: nn.Module, block: Block, batches: Sequence[Any]) -> list[torch.Tensor]:
    """The original's activation at the block's end, per batch."""
    with torch.no_grad(), copying.eval_mode(original), BlockForward(original, block, original=True) as forward:
        return [forward(batch).detach().clone() for batch in batches]


def block_error(model: nn.Module, block: Block, batches: Sequence[Any], targets: list[torch.Tensor]) -> float:
    """RMS relative error at the block's end over the calibration data."""
    sse = total = 0.0
    with torch.no_grad(), BlockForward(model, block) as forward:
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


def trace_block(model: nn.Module, block: Block, batch: Any) -> None:
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
        with copying.eval_mode(model), BlockForward(model, block) as forward:
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
