"""Pooling modes: a mode is a file that registers itself.

A toy mode (max pooling -> average pooling without padding counted, no new
weights) is declared here, in this file only, the way the built-in modes
are declared in ``convify/fx/rewrites/maxpool/``, and goes through
``replace_maxpool``, ``convify.convify``, the command line (``--pool``), a
checkpoint recipe that loads back to the same layers, and ``verify``'s ONNX
census, with no other file of convify edited. Recovery reads its records, not
its name.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import convify
from convify.core.report import Replaced
from convify.core.rewrites.maxpool import POOL_MODES, SPEC, MaxPoolOptions, PoolMode, PoolParams, PoolRecord
from convify.errors import OptionError, UsageError
from convify.fx import nodes
from convify.fx.rewrites.base import Site
from convify.fx.rewrites.maxpool.modes import (FX_POOL_MODES, FxPoolMode, forget_pool_mode, new_module_target,
                                               pool_mode, site_input, site_shapes, swap_in)

from conftest import rel_err

AVERAGE = PoolMode("average", "average pooling over the same windows (the padding not counted)", learned=False)


class Average(FxPoolMode):
    """The toy: ``AvgPoolNd(k, s, p, ceil_mode, count_include_pad=False)``; no dilation."""

    def skip_reason(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> str | None:
        if any(d != 1 for d in site.params.dilation) or site.params.same:
            return "average pooling has no dilation and no 'same' padding"
        return None

    def apply(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> Replaced:
        p = site.params
        pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[p.dims](
            p.kernel, p.stride, p.padding, ceil_mode=p.ceil_mode, count_include_pad=False)
        target, training = new_module_target(gm, site)
        nodes.set_submodule(gm, target, pool.train(training))
        inp, out = site_shapes(site)
        with gm.graph.inserting_before(site.node):
            new = gm.graph.call_module(target, (site_input(site.node),))
        swap_in(gm, site, new)
        return Replaced(SPEC.name, site.name, site.op, f"AvgPool{p.dims}d", inp.shape, out.shape, exact=False,
                        module=target, detail=PoolRecord(p, self.mode.name))


def net() -> nn.Module:
    """Two max poolings (one dilated) and a Linear head; a factory the CLI can import."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2, 1, dilation=2), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


def averaged(model: nn.Module) -> nn.Module:
    """What the toy mode should make of ``net()``, written by hand."""
    by_hand = net()
    by_hand.load_state_dict(model.state_dict())
    by_hand[2] = nn.AvgPool2d(2, 2, 0, count_include_pad=False)
    return by_hand


@pytest.fixture
def toy():
    pool_mode(AVERAGE)(Average)
    yield Average
    forget_pool_mode("average")
    assert "average" not in POOL_MODES and "average" not in FX_POOL_MODES


def test_builtin_modes_are_registered_in_the_core_and_implemented_here():
    assert list(POOL_MODES)[:3] == ["conv", "depthwise", "fold"]
    assert set(POOL_MODES) <= set(FX_POOL_MODES)
    assert not POOL_MODES["fold"].learned and POOL_MODES["conv"].learned


def test_toy_mode_runs_through_replace_maxpool_and_convify(toy):
    model = net()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = convify.replace_maxpool(model, x[:1], mode="average")
    rep = convify.report(out)
    assert [(r.name, r.detail.mode) for r in rep.replaced] == [("2", "average")]
    assert [(s.name, s.reason) for s in rep.skipped] == [("5", "average pooling has no dilation and no 'same' "
                                                                "padding")]
    assert isinstance(out.get_submodule("2"), nn.AvgPool2d)
    with torch.no_grad():
        assert rel_err(out(x), averaged(model)(x)) <= 1e-6
    both = convify.convify(model, x[:1], pool="average")
    assert [p.rewrite for p in convify.report(both).passes] == ["maxpool", "head"]
    assert convify.report(both).passes[0].options == {"mode": "average", "init": "avg"}


def test_toy_mode_adds_no_weights_so_fit_and_reconstruct_find_nothing(toy):
    model = net()
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fitted = convify.replace_maxpool(model, batches[0][:1], mode="average", init="fit", calibration=batches)
    rep = convify.report(fitted)
    assert rep.replaced[0].fit is None
    assert any("mode='average': its sites add no weights to fit" in n for n in rep.notes)
    with pytest.raises(UsageError, match="nothing to reconstruct"):
        convify.reconstruct(model, fitted, batches)


def test_toy_mode_runs_through_the_cli_a_checkpoint_and_verify(toy, tmp_path, capsys):
    from convify.cli import main

    with pytest.raises(SystemExit):
        main(["rewrite", "--help"])
    assert "average: average pooling over the same windows" in " ".join(capsys.readouterr().out.split())

    out = tmp_path / "toy.pt"
    arch = ["--arch", "test_pool_modes:net", "--input-shape", "1,3,16,16"]
    code = main(["rewrite", *arch, "--pool", "average", "--head", "none", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    raw = torch.load(out, weights_only=True)
    assert raw["passes"][0]["options"] == {"mode": "average", "init": "avg"}
    back = convify.load(out, trust_code=True)
    assert [(r.name, r.detail.mode) for r in convify.report(back).replaced] == [("2", "average")]
    assert isinstance(back.get_submodule("2"), nn.AvgPool2d)
    model = net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(back(x), averaged(model)(x)) <= 1e-6

    v = convify.verify(model, back, x[:1])
    census = [c for c in v.checks if "MaxPool" in c.ops]
    assert len(census) == 1 and census[0].passed
    assert census[0].original == 2 and census[0].rewritten == 1  # the dilated pool was skipped, with its reason


def test_an_unknown_or_forgotten_mode_is_refused_with_the_known_ones(toy):
    with pytest.raises(OptionError, match="maxpool: mode must be one of 'conv', 'depthwise', 'fold', 'exact', "
                                          "'average', not 'avg'"):
        convify.replace_maxpool(net(), torch.zeros(1, 3, 16, 16), mode="avg")
    forget_pool_mode("average")
    with pytest.raises(OptionError, match="mode must be one of 'conv', 'depthwise', 'fold', 'exact', not 'average'"):
        convify.convify(net(), torch.zeros(1, 3, 16, 16), pool="average")
    pool_mode(AVERAGE)(Average)  # the fixture forgets it again


def test_a_mode_declared_in_the_core_only_is_refused_by_the_fx_frontend():
    from convify.core.rewrites.maxpool import register_pool_mode, unregister_pool_mode

    register_pool_mode(PoolMode("elsewhere", "implemented by another frontend only"))
    try:
        with pytest.raises(UsageError, match="pooling mode 'elsewhere' has no torch.fx implementation"):
            convify.replace_maxpool(net(), torch.zeros(1, 3, 16, 16), mode="elsewhere")
    finally:
        unregister_pool_mode("elsewhere")
