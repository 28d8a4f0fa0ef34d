"""The shared rewrite mechanism: fallback details, leaf reporting, filters."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convify
from convify.core.registry import REGISTRY, get
from convify.errors import ConvifyError, ExampleInputError, UsageError
from convify.fx.engine import rewrite_model
from convify.fx.rewrites import implementation


class TwiceFromUntraceable(nn.Module):
    def __init__(self, second: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, second, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool(self.a(x))
        assert x.sum().item() == x.sum().item()  # keeps torch.fx out
        return self.pool(self.b(x))


def test_pool_called_twice_from_untraceable_code_with_same_channels_is_replaced():
    model = TwiceFromUntraceable(4).eval()
    x = torch.randn(2, 3, 16, 16)
    out = convify.replace_maxpool(model, x[:1])
    assert isinstance(out.pool, nn.Conv2d)
    with torch.no_grad():
        want = F.avg_pool2d(model.b(F.avg_pool2d(model.a(x), 2)), 2)
        assert torch.allclose(out(x), want, atol=1e-6)


def test_pool_called_twice_from_untraceable_code_with_other_channels_is_skipped():
    out = convify.replace_maxpool(TwiceFromUntraceable(6).eval(), torch.randn(1, 3, 16, 16))
    rep = convify.report(out)
    assert rep.replaced == ()
    assert "[4, 6] channels" in rep.skipped[0].reason
    assert isinstance(out.pool, nn.MaxPool2d)


def test_pool_inside_an_opaque_leaf_is_reported():
    timm = pytest.importorskip("timm")
    from timm.layers import _fx

    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.conv(x))

    _fx._leaf_modules.add(Opaque)
    try:
        out = convify.replace_maxpool(nn.Sequential(Opaque(), nn.MaxPool2d(2)).eval(), torch.randn(1, 3, 8, 8))
    finally:
        _fx._leaf_modules.discard(Opaque)
    rep = convify.report(out)
    assert [r.name for r in rep.replaced] == ["1"]
    assert rep.skipped[0].name == "0.pool" and "timm registers" in rep.skipped[0].reason


def test_registry_and_errors():
    assert "maxpool" in REGISTRY
    with pytest.raises(UsageError, match="no rewrite named 'nope'; known: .*maxpool"):
        get("nope")
    with pytest.raises(UsageError, match="no rewrite named 'nope'; known: .*maxpool"):
        implementation("nope")
    with pytest.raises(ConvifyError, match="expected a torch.nn.Module"):
        rewrite_model("resnet", implementation("maxpool")())
    with pytest.raises(ExampleInputError, match="tensor or a tuple of tensors"):
        convify.replace_maxpool(nn.Conv2d(3, 3, 1), example_input=[1, 2])


def test_torchscript_is_refused_with_reason():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), nn.MaxPool2d(2)))
    with pytest.raises(ConvifyError, match="TorchScript"):
        convify.replace_maxpool(scripted)


class PooledUntraceably(nn.Module):
    """Global pooling inside a forward torch.fx cannot trace (a branch on data)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > float("-inf"):
            x = x.relu()
        return self.pool(x)


class PinnedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = PooledUntraceably()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_dense_says_which_untraced_pooling_pins_the_size():
    out = convify.replace_linear_head(PinnedHead().eval(), torch.randn(1, 3, 16, 16), dense=True)
    (row,) = convify.report(out).passes[0].replaced
    assert row.name == "classifier.1"
    assert any("by features.pool (AdaptiveAvgPool2d), called from code torch.fx could not trace" in n
               and "1x1 at any input size" in n for n in row.notes), row.notes
    assert out(torch.randn(1, 3, 32, 32)).shape == (1, 5, 1, 1)
    plain = convify.replace_linear_head(PinnedHead().eval(), torch.randn(1, 3, 16, 16))
    (plain,) = convify.report(plain).passes[0].replaced
    assert not any("reduced to one value per channel" in n for n in plain.notes)


class CallsWithKeywords(nn.Module):
    """An untraceable parent calling a traceable child with keyword arguments."""

    def __init__(self, second: bool) -> None:
        super().__init__()
        self.block = Block()
        self.second = second

    def forward(self, x):
        assert x.sum().item() == x.sum().item()  # keeps torch.fx out
        x = self.block(x, twice=False)
        return self.block(x, twice=self.second)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x, twice: bool = True):
        x = self.pool(x)
        return self.pool(x) if twice else x


def test_fallback_traces_children_with_the_keywords_their_parent_gives():
    model = CallsWithKeywords(second=False).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16))
    assert [r.name for r in convify.report(out).passes[0].replaced] == ["block.pool"]
    x = torch.randn(1, 3, 16, 16)
    assert out(x).shape == model(x).shape == (1, 3, 4, 4)


def test_fallback_does_not_trace_a_child_called_with_different_keywords():
    out = convify.replace_maxpool(CallsWithKeywords(second=True).eval(), torch.randn(1, 3, 16, 16))
    rep = convify.report(out).passes[0]
    assert any(u.name == "block" and "'twice' different values" in u.reason for u in rep.untraced)
    assert [r.name for r in rep.replaced] == ["block.pool"]  # reached through the fallback's wrapper
    assert out(torch.randn(1, 3, 16, 16)).shape == (1, 3, 2, 2)


def test_levit_after_a_forward_outside_no_grad_is_copied():
    timm = pytest.importorskip("timm")
    model = timm.create_model("levit_128s", pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    model(x)  # caches attention biases with a grad_fn
    out = convify.convify(model, x)
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


def test_dense_says_which_opaque_module_pins_the_size():
    timm = pytest.importorskip("timm")
    from timm.layers import _fx

    class OpaqueFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.conv(x))

    model = nn.Sequential(OpaqueFeatures(), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5)).eval()
    _fx._leaf_modules.add(OpaqueFeatures)
    try:
        out = convify.replace_linear_head(model, torch.randn(1, 3, 16, 16), dense=True)
    finally:
        _fx._leaf_modules.discard(OpaqueFeatures)
    (row,) = convify.report(out).passes[0].replaced
    assert any("by 0 (OpaqueFeatures), a module torch.fx does not enter" in n for n in row.notes), row.notes
