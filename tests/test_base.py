"""The rewrite mechanism: a rewrite declared once runs everywhere.

A toy third rewrite (average pooling -> an exact depthwise strided
convolution) is declared here, in this file only, as the core declares its
rewrites (a :class:`RewriteSpec`) and as the torch.fx frontend implements
them (a :class:`Rewrite` marked with ``implements``), and goes through
``convify.convify``, the command line, a saved and reloaded checkpoint, and
``verify``'s ONNX census, with no other file of convify edited.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import convify
from convify.core.options import RewriteOptions, option
from convify.core.registry import REGISTRY, register
from convify.core.report import Replaced
from convify.core.spec import RewriteSpec
from convify.errors import OptionError, UsageError
from convify.fx import nodes, shapes
from convify.fx.rewrites import IMPLEMENTATIONS, forget, implements
from convify.fx.rewrites.base import Rewrite, Site

from conftest import reinit, rel_err


@dataclass(frozen=True)
class AvgPoolRecord:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class AvgPoolOptions(RewriteOptions):
    mode: str | None = option(None, "average pooling becomes an exact depthwise strided conv",
                              choices=(None, "depthwise"))
    scale: float = option(1.0, "multiply the new weights by this (1: exact)")


AVGPOOL = RewriteSpec(name="avgpool", Options=AvgPoolOptions, keyword="avgpool",
                      summary="average pooling becomes a depthwise convolution", order=15, onnx_ops=("AveragePool",))


class ReplaceAvgPool(Rewrite[nn.AvgPool2d]):
    """The toy: every plain nn.AvgPool2d without padding becomes Conv2d(C, C, k, s, groups=C)."""

    leaf_modules = (nn.AvgPool2d,)

    def find_sites(self, gm: fx.GraphModule) -> list[Site[nn.AvgPool2d]]:
        sites = []
        names = nodes.CallNames()
        for node in gm.graph.nodes:
            if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.AvgPool2d:
                pool = gm.get_submodule(node.target)
                reason = "padded" if pool.padding not in (0, (0, 0)) else None
                sites.append(Site(names(node.target), node, "AvgPool2d", skip_reason=reason, params=pool))
        return sites

    def apply(self, gm: fx.GraphModule, site: Site[nn.AvgPool2d]) -> Replaced:
        pool: nn.AvgPool2d = site.params
        k = (pool.kernel_size,) * 2 if isinstance(pool.kernel_size, int) else tuple(pool.kernel_size)
        s = (pool.stride,) * 2 if isinstance(pool.stride, int) else tuple(pool.stride)
        channels = shapes.input_info(site.node).shape[1]
        conv = nn.Conv2d(channels, channels, k, s, groups=channels, bias=False)
        with torch.no_grad():
            conv.weight.fill_(self.options.scale / (k[0] * k[1]))
        nodes.set_submodule(gm, site.node.target, conv)
        return Replaced(self.name, site.name, site.op, f"Conv2d({channels}, {channels}, groups={channels})",
                        shapes.input_info(site.node).shape, shapes.info(site.node).shape, exact=self.options.scale == 1.0,
                        module=site.node.target, detail=AvgPoolRecord(k, s))


def avg_net() -> nn.Module:
    """A model with one max pooling, one average pooling and a Linear head (a factory the CLI can import)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()


@pytest.fixture
def toy():
    implements(AVGPOOL)(ReplaceAvgPool)
    yield ReplaceAvgPool
    forget("avgpool")
    assert "avgpool" not in REGISTRY and "avgpool" not in IMPLEMENTATIONS


def test_toy_rewrite_runs_through_convify(toy):
    model = reinit(avg_net()).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = convify.convify(model, x[:1])
    assert [p.rewrite for p in convify.report(plain).passes] == ["maxpool", "head"]  # opt-in: mode defaults to None
    out = convify.convify(model, x[:1], avgpool="depthwise", pool=None, head=None)
    rep = convify.report(out)
    assert [p.rewrite for p in rep.passes] == ["avgpool"]
    assert rep.replaced[0].detail == AvgPoolRecord((2, 2), (2, 2)) and rep.exact
    assert not any(isinstance(m, nn.AvgPool2d) for m in out.modules())
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-5
    every = convify.convify(model, x[:1], avgpool="depthwise")
    assert [p.rewrite for p in convify.report(every).passes] == ["maxpool", "avgpool", "head"]  # by `order`
    with pytest.raises(OptionError, match="avgpool: mode must be one of None, 'depthwise', not 'conv'"):
        convify.convify(model, x[:1], avgpool="conv")
    with pytest.raises(UsageError, match=r"unknown options \['avgpol'\]"):
        convify.convify(model, x[:1], avgpol="depthwise")


def test_toy_rewrite_runs_through_the_cli_a_checkpoint_and_verify(toy, tmp_path, capsys):
    from convify.cli import main

    out = tmp_path / "toy.pt"
    arch = ["--arch", "test_base:avg_net", "--input-shape", "1,3,16,16"]
    code = main(["rewrite", *arch, "--avgpool", "depthwise", "--scale", "0.5", "--pool", "none", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "avgpool" in capsys.readouterr().out
    raw = torch.load(out, weights_only=True)
    assert raw["passes"][0] == {"rewrite": "avgpool", "options": {"mode": "depthwise", "scale": 0.5},
                                "only": None, "skip": None, "input_shape": [1, 3, 16, 16]}
    back = convify.load(out, trust_code=True)
    rep = convify.report(back)
    assert [p.rewrite for p in rep.passes] == ["avgpool", "head"] and rep.passes[0].options["scale"] == 0.5
    assert not any(isinstance(m, (nn.AvgPool2d, nn.Linear)) for m in back.modules())
    model = avg_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # scale 0.5 halves the pooled map; the head is linear after it, so the logits move but stay defined
        assert rel_err(back(x), model(x)) > 1e-3
        exact = convify.convify(model, x[:1], avgpool="depthwise", pool=None)
        assert rel_err(exact(x), model(x)) <= 1e-5

    v = convify.verify(model, exact, x[:1])
    census = [c for c in v.checks if "AveragePool" in c.ops]
    assert len(census) == 1 and census[0].passed and census[0].original == 1 and census[0].rewritten == 0
    assert v.passed


def test_registering_a_clashing_keyword_is_refused():
    @dataclass(frozen=True)
    class Clash(RewriteOptions):
        mode: str = option("x", "a mode", choices=("x",))
        init: str = option("avg", "the maxpool rewrite's init, taken")

    with pytest.raises(UsageError, match="keyword 'init' is already taken by maxpool"):
        register(RewriteSpec(name="clash", Options=Clash, keyword="clash"))
    assert "clash" not in REGISTRY


def test_a_spec_without_a_mode_or_an_implementation_is_refused():
    @dataclass(frozen=True)
    class NoMode(RewriteOptions):
        scale: float = option(1.0, "a number")

    with pytest.raises(UsageError, match="rewrite 'nomode': its Options need a 'mode' field"):
        RewriteSpec(name="nomode", Options=NoMode, keyword="nomode")
    register(AVGPOOL)  # declared in the core, not implemented in the torch.fx frontend
    try:
        with pytest.raises(UsageError, match="rewrite 'avgpool' has no torch.fx implementation"):
            convify.convify(avg_net(), torch.zeros(1, 3, 16, 16), avgpool="depthwise")
    finally:
        forget("avgpool")
