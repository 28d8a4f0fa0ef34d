"""replace_maxpool: tiny models for each behaviour, then the torchvision zoo."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import convify
from convify.demo.reference import avg_reference
from convify.errors import ExampleInputError, OptionError
from convify.fx.rewrites.maxpool import PadSame
from convify.fx.shapes import meta_weights
from convify.zoo import model_c

from conftest import assert_input_dependent, reinit, rel_err
from zoo import MAXPOOL_ZOO, build


def pools_left(model: nn.Module) -> list[str]:
    """Every max pooling a forward pass still runs (modules and functional calls)."""
    found = [n for n, m in model.named_modules() if isinstance(m, nn.modules.pooling._MaxPoolNd)]
    if isinstance(model, fx.GraphModule):
        found += [n.name for n in model.graph.nodes if n.op == "call_function"
                  and n.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                                   torch.max_pool3d)]
    return found


def check_avg(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    """Rewrite with avg init and compare against the avg-pool reference."""
    out = convify.replace_maxpool(model, x[:1], **kw)
    ref, count = avg_reference(model, x)
    with torch.no_grad():
        got = out(x)
    assert count > 0
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5
    return out


# ---------------------------------------------------------------- tiny models


class SharedPool(nn.Module):
    """One pool instance called after convolutions of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv2(self.pool(self.conv1(x))))


def test_shared_pool_gets_one_conv_per_call_site():
    model = SharedPool().eval()
    out = check_avg(model, torch.randn(2, 3, 16, 16))
    rows = convify.report(out).replaced
    assert [r.name for r in rows] == ["pool", "pool@1"]
    assert out.get_submodule("pool").weight.shape == (8, 8, 2, 2)
    assert out.get_submodule("pool@1").weight.shape == (16, 16, 2, 2)
    assert {"pool.weight", "pool@1.weight"} <= set(out.state_dict())
    assert pools_left(out) == []


def test_shared_pool_skip_one_site_keeps_the_pool_there():
    model = SharedPool().eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16), skip="pool@1")
    rep = convify.report(out)
    assert [r.name for r in rep.replaced] == ["pool"]
    assert [(s.name, s.reason) for s in rep.skipped] == [("pool@1", "matched skip pattern 'pool@1'")]
    assert isinstance(out.get_submodule("pool"), nn.Conv2d)
    assert isinstance(out.get_submodule("pool@1"), nn.MaxPool2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = F.max_pool2d(model.conv2(F.avg_pool2d(model.conv1(x), 2)), 2)
        assert rel_err(out(x), expected) <= 1e-6


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        a = F.max_pool2d(self.conv(x), 2)                                      # positional
        b = F.max_pool2d(input=a, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0))  # keywords
        return torch.max_pool2d(b, 2, 2, 0, 1, True)                           # torch.* with ceil_mode


def test_functional_calls_positional_and_keyword():
    out = check_avg(Functional().eval(), torch.randn(2, 3, 21, 19))
    rows = convify.report(out).replaced
    assert [r.name for r in rows] == ["max_pool2d", "max_pool2d@1", "max_pool2d@2"]
    assert [r.old for r in rows] == [
        "F.max_pool2d(k=2, s=2)", "F.max_pool2d(k=3x2, s=1x2, p=1x0)", "F.max_pool2d(k=2, s=2, ceil_mode)"]
    assert pools_left(out) == []


@pytest.mark.parametrize("size", range(9, 20))
@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (3, 2, 1), (2, 2, 0), (3, 3, 1), (5, 3, 2)])
def test_ceil_mode_keeps_shape_at_every_size(k, s, p, size):
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.MaxPool2d(k, s, p, ceil_mode=True)).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 2, 16, 16))
    x = torch.randn(2, 2, size, size + 1)
    ref, _ = avg_reference(model, x)
    with torch.no_grad():
        got = out(x)
        assert got.shape == model(x).shape
    assert rel_err(got, ref) <= 1e-5


def test_padding_dilation_and_non_square_kernel_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0),
                                                          dilation=(2, 3))).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 17, 15))
    conv = out.get_submodule("1")
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 2), (2, 1), (1, 0), (2, 3))
    x = torch.randn(2, 3, 23, 20)
    with torch.no_grad():
        h = model[0](x)
        expected = F.conv2d(h, conv.weight, None, (2, 1), (1, 0), (2, 3))
        assert out(x).shape == model(x).shape
        assert rel_err(out(x), expected) <= 1e-6
    # avg init: each output is the mean of its 6 dilated taps of its own channel
    assert torch.allclose(conv.weight[0, 0], torch.full((3, 2), 1 / 6))
    assert conv.weight[0, 1].abs().sum() == 0


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d(dims):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    pool = {1: nn.MaxPool1d, 3: nn.MaxPool3d}[dims]
    model = nn.Sequential(conv(2, 5, 3), pool(3, 2, 1, ceil_mode=True), conv(5, 4, 1)).eval()
    shape = (2, 2) + ((33,) if dims == 1 else (9, 10, 11))
    out = check_avg(model, torch.randn(shape))
    assert isinstance(out.get_submodule("1"), {1: nn.Conv1d, 3: nn.Conv3d}[dims])


class Indices(nn.Module):
    def __init__(self, use_indices: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.use_indices = use_indices

    def forward(self, x):
        y, idx = self.pool(self.conv(x))
        return self.unpool(y, idx) if self.use_indices else y * 2


def test_return_indices_used_is_skipped_with_reason():
    out = convify.replace_maxpool(Indices(True).eval(), torch.randn(1, 3, 8, 8))
    rep = convify.report(out)
    assert rep.replaced == ()
    assert "indices are used" in rep.skipped[0].reason
    assert pools_left(out) == ["pool"]


def test_return_indices_unused_is_replaced():
    model = Indices(False).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(out(x), F.avg_pool2d(model.conv(x), 2) * 2) <= 1e-6


class AdaptiveMax(nn.Module):
    """Adaptive max pooling as a module and as a call, behind a fixed-window one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.adaptive = nn.AdaptiveMaxPool2d((3, 2))

    def forward(self, x):
        x = self.pool(self.conv(x))
        return self.adaptive(x) + F.adaptive_max_pool2d(x, (3, 2))


def test_adaptive_max_pooling_is_skipped_with_reason():
    model = AdaptiveMax().eval()
    x = torch.randn(2, 3, 16, 12)
    out = convify.replace_maxpool(model, x[:1])
    rep = convify.report(out)
    assert [r.name for r in rep.replaced] == ["pool"]
    assert [(s.name, s.op) for s in rep.skipped] == [("adaptive", "AdaptiveMaxPool2d"),
                                                     ("adaptive_max_pool2d", "adaptive_max_pool2d")]
    for s in rep.skipped:
        assert s.reason.startswith("adaptive max pooling: its windows depend on the input size"), s.reason
    assert isinstance(out.get_submodule("adaptive"), nn.AdaptiveMaxPool2d)
    with torch.no_grad():
        expected = 2 * F.adaptive_max_pool2d(F.avg_pool2d(model.conv(x), 2), (3, 2))
        assert rel_err(out(x), expected) <= 1e-6


class SamePool(nn.MaxPool2d):
    """Like timm's MaxPool2dSame: pads with -inf before pooling."""

    def forward(self, x):
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-float("inf")), self.kernel_size, self.stride)


def test_maxpool_subclass_with_own_forward_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SamePool(3, 2), nn.MaxPool2d(2)).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16))
    rep = convify.report(out)
    assert [r.name for r in rep.replaced] == ["2"]
    assert [s.name for s in rep.skipped] == ["1"]
    assert "own forward" in rep.skipped[0].reason
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(out(x)).all()


# ---------------------------------------------------------------- "same" max pooling (timm's MaxPool2dSame)


def same_avg_expected(h: torch.Tensor, k: int, s: int, d: int = 1) -> torch.Tensor:
    """What init="avg" promises at a "same" pool, computed with timm's own
    padding: zero-padded as timm's pad_same pads, the window average counting the zeros."""
    from timm.layers.padding import pad_same
    c = h.shape[1]
    weight = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=h.dtype)
    return F.conv2d(pad_same(h, (k, k), (s, s), (d, d), value=0.0), weight, stride=s, dilation=d, groups=c)


@pytest.mark.parametrize("k,s,d,ceil_mode", [(3, 2, 1, False), (2, 2, 1, False), (3, 1, 1, False), (2, 3, 1, False),
                                             (1, 2, 1, False), (3, 2, 2, False), (3, 2, 1, True)])
def test_same_pool_becomes_a_same_padded_conv_at_every_size(k, s, d, ceil_mode):
    pytest.importorskip("timm")
    from timm.layers.pool2d_same import MaxPool2dSame
    model = nn.Sequential(nn.Conv2d(3, 4, 1), MaxPool2dSame(k, s, dilation=d, ceil_mode=ceil_mode)).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 15, 15))
    assert pools_left(out) == []
    row = convify.report(out).replaced[0]
    assert row.detail.params.same and row.detail.params.padding == (0, 0) and row.new.endswith("+pad same)")
    assert isinstance(out.get_submodule("1_pad"), PadSame) and out.get_submodule("1").padding == (0, 0)
    for size in range(1, 21):
        x = torch.randn(2, 3, size, size + 3)
        with torch.no_grad():
            got = out(x)
            assert got.shape == model(x).shape, size
            assert rel_err(got, same_avg_expected(model[0](x), k, s, d)) <= 1e-6, size


def test_same_pool_modes_fold_and_depthwise():
    pytest.importorskip("timm")
    from timm.layers.pool2d_same import MaxPool2dSame
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), MaxPool2dSame(3, 2)).eval()
    depthwise = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16), mode="depthwise")
    assert depthwise.get_submodule("2").groups == 4
    again = convify.replace_maxpool(depthwise)  # PadSame stays one call: nothing left to replace
    assert convify.report(again).last.replaced == () and isinstance(again.get_submodule("2_pad"), PadSame)
    folded = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16), mode="fold")
    assert convify.report(folded).replaced[0].detail.mode == "fold"
    for size in (15, 16, 17):  # a stride-s conv gives ceil(n/s) like a "same" pool: at every size
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert depthwise(x).shape == folded(x).shape == model(x).shape


def test_maxpool2dsame_subclass_with_its_own_forward_is_skipped():
    pytest.importorskip("timm")
    from timm.layers.pool2d_same import MaxPool2dSame

    class Twice(MaxPool2dSame):
        def forward(self, x):
            return 2 * super().forward(x)

    out = convify.replace_maxpool(nn.Sequential(nn.Conv2d(3, 4, 3), Twice(3, 2)).eval(), torch.randn(1, 3, 15, 15))
    rep = convify.report(out)
    assert rep.replaced == () and "Twice subclasses MaxPool2d with its own forward" in rep.skipped[0].reason


def test_maxpool2dsame_is_checked_by_behaviour_not_by_name(monkeypatch):
    """Were timm to pad differently, its pool would be skipped, not silently mis-converted."""
    pytest.importorskip("timm")
    from timm.layers import pool2d_same

    def pad_left_heavy(x, k, s, d=(1, 1), value=0.0):
        return F.pad(x, (2, 0, 2, 0), value=value)

    monkeypatch.setattr(pool2d_same, "pad_same", pad_left_heavy)
    out = convify.replace_maxpool(nn.Sequential(nn.Conv2d(3, 4, 3), pool2d_same.MaxPool2dSame(3, 2)).eval(),
                                  torch.randn(1, 3, 15, 15))
    rep = convify.report(out)
    assert rep.replaced == () and "does not compute timm's 'same' max pooling" in rep.skipped[0].reason


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "legacy"])
def test_same_pool_exports_with_dynamic_size_and_verifies(tmp_path, exporter):
    pytest.importorskip("timm")
    ort = pytest.importorskip("onnxruntime")
    from timm.layers.pool2d_same import MaxPool2dSame
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MaxPool2dSame(3, 2), nn.Conv2d(4, 4, 1), MaxPool2dSame(2, 3)).eval()
    x = torch.randn(1, 3, 15, 15)
    out = convify.replace_maxpool(model, x)
    path = convify.export_onnx(out, tmp_path / "same.onnx", x, dynamic_spatial=True, exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in [(15, 15), (16, 17), (9, 22), (30, 31)]:
        y = torch.randn(2, 3, h, w)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: y.numpy()})[0])
        with torch.no_grad():
            assert got.shape == model(y).shape
            assert rel_err(got, out(y)) <= 1e-5
    assert convify.verify(model, out, x, exporter=exporter).passed


@pytest.fixture(scope="module")
def timm_same_models():
    """nasnetalarge and pnasnet5large (88M and 86M parameters, timm's own init)
    and a ResNetV2 with a "same" stem pool, built once for this module."""
    timm = pytest.importorskip("timm")
    return {name: timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
            for name, kw in [("nasnetalarge", {}), ("pnasnet5large", {}), ("resnetv2_18", {"stem_type": "same"})]}


@pytest.mark.parametrize("name,same_sites", [pytest.param("nasnetalarge", 8, marks=pytest.mark.slow),
                                              pytest.param("pnasnet5large", 12, marks=pytest.mark.slow),
                                              ("resnetv2_18", 1)])
def test_timm_models_with_same_pools_keep_their_shapes(timm_same_models, name, same_sites):
    model = timm_same_models[name]
    sizes = (64, 45)
    with torch.no_grad(), meta_weights(model):  # the original's shapes, without arithmetic
        before = {n: model(torch.zeros(1, 3, n, n, device="meta")).shape for n in sizes}
    out = convify.replace_maxpool(model, torch.randn(1, 3, 64, 64), inplace=True)  # the only test of this model
    rep = convify.report(out)
    assert rep.skipped == () and pools_left(out) == []
    assert sum(r.detail.params.same for r in rep.replaced) == same_sites
    assert sum(isinstance(m, PadSame) for m in out.modules()) == same_sites
    with torch.no_grad():
        for n in sizes:
            y = out(torch.randn(1, 3, n, n))
            assert y.shape == before[n] and torch.isfinite(y).all()


class Untraceable(nn.Module):
    """Control flow on a tensor value at the top level; traceable children."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace this
            x = self.pool(x)
        x = F.max_pool2d(x, 2)  # inside the untraceable forward itself
        return self.head(x)


def test_untraceable_model_falls_back_to_submodules():
    model = Untraceable().eval()
    x = torch.randn(2, 3, 32, 32)
    out = convify.replace_maxpool(model, x[:1])
    rep = convify.report(out)
    assert not isinstance(out, fx.GraphModule) and isinstance(out, Untraceable)
    assert [r.name for r in rep.replaced] == ["features.2", "pool"]
    assert [u.name for u in rep.untraced] == [""]  # the root only: its children traced
    assert rep.untraced[0].reason.startswith("TraceError: ") and "control flow" in rep.untraced[0].reason
    skipped = {s.name: s.reason for s in rep.skipped}
    assert "max_pool2d" in skipped and "cannot trace" in skipped["max_pool2d"]
    with torch.no_grad():
        h = F.avg_pool2d(model.features[1](model.features[0](x)), 2)
        expected = model.head(F.max_pool2d(F.avg_pool2d(h, 2), 2))
        assert rel_err(out(x), expected) <= 1e-6
    assert "Untraceable" in str(rep) and "features.2" in str(rep)


def test_float64_and_dtype_of_new_weights():
    model = SharedPool().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = convify.replace_maxpool(model, x[:1])
    assert out.get_submodule("pool").weight.dtype == torch.float64
    with torch.no_grad():
        ref, _ = avg_reference(model, x)
        assert rel_err(out(x), ref) <= 1e-12


def test_train_mode_is_kept_and_batchnorm_stats_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)).train()
    before = copy.deepcopy(model.state_dict())
    out = convify.replace_maxpool(model, torch.randn(1, 3, 8, 8))
    assert out.training and out.get_submodule("1").training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], out.state_dict()[k]) for k in before)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)).train()
    frozen[1].eval()  # a frozen BatchNorm inside a model in train mode
    assert convify.replace_maxpool(frozen).get_submodule("1").training is False


def test_input_not_mutated_and_shares_no_parameters():
    model = SharedPool().eval()
    state = copy.deepcopy(model.state_dict())
    out = convify.replace_maxpool(model)
    assert isinstance(model.pool, nn.MaxPool2d)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    ids = {id(p) for p in model.parameters()}
    assert not ids & {id(p) for p in out.parameters()}
    with torch.no_grad():
        for p in out.parameters():
            p.add_(1.0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_inplace_reuses_parameters():
    model = Untraceable().eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 32, 32), inplace=True)
    assert out is model and isinstance(model.pool, nn.Conv2d)


def test_idempotent():
    once = convify.replace_maxpool(SharedPool().eval())
    twice = convify.replace_maxpool(once)
    assert convify.report(twice).last.replaced == ()
    assert len(convify.report(twice).passes) == 2
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))


def test_only_and_skip_globs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2)).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 20, 20), only=["3"])
    rep = convify.report(out)
    assert [r.name for r in rep.replaced] == ["3"]
    assert rep.skipped[0].name == "1" and "only" in rep.skipped[0].reason
    out = convify.replace_maxpool(model, torch.randn(1, 3, 20, 20), skip="nope*")
    assert any("matched no maxpool site" in n for n in convify.report(out).notes)


def test_depthwise_mode():
    model = SharedPool().eval()
    out = check_avg(model, torch.randn(2, 3, 16, 16), mode="depthwise")
    conv = out.get_submodule("pool@1")
    assert conv.groups == 16 and conv.weight.shape == (16, 1, 2, 2)


class FoldNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = nn.MaxPool2d(3, 2, 1)
        self.pool3 = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn(self.conv1(x))))
        y = self.conv2(x)
        x = self.pool2(y) + 0 * y.mean()  # y also used elsewhere: no fold
        return self.pool3(x)               # produced by an add: no fold


def test_fold_mode_moves_stride_onto_producer():
    model = reinit(FoldNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    out = convify.replace_maxpool(model, x[:1], mode="fold")
    rep = convify.report(out)
    folded = rep.replaced[0]
    assert folded.name == "pool1" and folded.module == "conv1" and "stride" in folded.new
    assert out.get_submodule("conv1").stride == (2, 2)
    assert folded.detail.mode == "fold" and folded.detail.params.stride == (2, 2)
    assert any("congruent" in n for n in rep.notes)
    assert folded.in_shape == (1, 8, 16, 16) and folded.out_shape == (1, 8, 8, 8)
    others = {r.name: r.detail for r in rep.replaced[1:]}
    assert all(d.mode == "conv" for d in others.values())
    assert "also used elsewhere" in others["pool2"].fold_blocker
    assert "not from a convolution" in others["pool3"].fold_blocker
    assert any("mode='conv'" in n for n in rep.replaced[1].notes)
    with torch.no_grad():
        assert out(x).shape == model(x).shape
        h = F.relu(model.bn(F.conv2d(x, model.conv1.weight, model.conv1.bias, 2, 1)))
        y = model.conv2(h)
        expected = F.avg_pool2d(F.avg_pool2d(y, 3, 2, 1) + 0 * y.mean(), 2)
        assert rel_err(out(x), expected) <= 1e-5
    assert model.conv1.stride == (1, 1)


def plain_chain() -> nn.Module:
    """conv -> BN -> ReLU -> maxpool -> conv -> ReLU -> maxpool (issue 13's report)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def vgg_chain() -> nn.Module:
    """VGG-style: two convolutions, then a pool, three times."""
    layers: list[nn.Module] = []
    for cin, cout in [(3, 8), (8, 16), (16, 16)]:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                   nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("make,size", [
    (plain_chain, 32), (vgg_chain, 32), (lambda: model_c(8), 32), (lambda: model_c(8, batch_norm=True), 33),
    (lambda: build("vgg11", seed=1), 64)], ids=["plain", "vgg_style", "model_c", "model_c_bn", "vgg11"])
def test_fold_chains_fold_every_pool(make, size):
    """Each fold is decided on the shapes as they are after the earlier folds."""
    model = reinit(make()).eval()
    x = torch.randn(2, 3, size, size)
    pool_shapes = []
    hooks = [m.register_forward_hook(lambda _m, a, o: pool_shapes.append((tuple(a[0].shape), tuple(o.shape))))
             for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    out = convify.replace_maxpool(model, x[:1], mode="fold")
    rows = convify.report(out).replaced
    assert len(rows) == len(pool_shapes) > 1
    assert [r.detail.fold_blocker for r in rows] == [None] * len(rows)
    assert all(r.detail.mode == "fold" for r in rows)
    assert [(r.in_shape, r.out_shape) for r in rows] == pool_shapes
    assert pools_left(out) == []
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert out(x).shape == model(x).shape


def test_fold_chain_computes_the_strided_network():
    model = reinit(plain_chain()).eval()
    x = torch.randn(2, 3, 32, 32)
    out = convify.replace_maxpool(model, x[:1], mode="fold")
    rows = convify.report(out).replaced
    assert [(r.module, r.in_shape, r.out_shape) for r in rows] == [
        ("0", (1, 8, 32, 32), (1, 8, 16, 16)), ("4", (1, 8, 16, 16), (1, 8, 8, 8))]
    c1, bn, c2 = model[0], model[1], model[4]
    with torch.no_grad():
        h = F.relu(bn(F.conv2d(x, c1.weight, c1.bias, 2, 1)))
        expected = F.relu(F.conv2d(h, c2.weight, c2.bias, 2, 1))
        assert rel_err(out(x), expected) <= 1e-6


def test_fold_refused_when_shape_would_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2)).eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16), mode="fold")
    row = convify.report(out).replaced[0]
    assert "would give" in row.detail.fold_blocker and isinstance(out.get_submodule("2"), nn.Conv2d)
    assert any("would give" in n for n in row.notes)


def test_kaiming_init_is_fresh_and_scaled():
    out = convify.replace_maxpool(SharedPool().eval(), init="kaiming")
    w = out.get_submodule("pool@1").weight
    assert float(w.detach().std()) == pytest.approx((1 / (16 * 4)) ** 0.5, rel=0.3)
    assert w[0, 1].abs().sum() > 0


def test_bad_options_name_the_fix():
    with pytest.raises(OptionError, match="maxpool: mode must be one of 'conv', 'depthwise', 'fold'"):
        convify.replace_maxpool(SharedPool(), mode="max")
    with pytest.raises(OptionError, match="maxpool: init must be one of"):
        convify.replace_maxpool(SharedPool(), init="zeros")


# ---------------------------------------------------------------- example input


class LeNet40(nn.Module):
    """Accepts exactly 40x40 inputs (flatten into a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5)
        self.fc = nn.Linear(4 * 18 * 18, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


def test_probe_input_is_solved_from_the_linear_head():
    out = convify.replace_maxpool(LeNet40().eval())
    assert convify.report(out).replaced[0].in_shape == (1, 4, 36, 36)


def test_no_usable_input_asks_for_example_input():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.shape[-1] != 1001:
                raise ValueError("wants 1001")
            return F.max_pool2d(self.conv(x), 2)

    with pytest.raises(ExampleInputError, match="pass example_input"):
        convify.replace_maxpool(Odd())


def test_wrong_example_input_names_the_node():
    with pytest.raises(ExampleInputError, match="conv1"):
        convify.replace_maxpool(SharedPool(), torch.randn(1, 5, 16, 16))


# ---------------------------------------------------------------- torchvision zoo


@pytest.mark.parametrize("name", list(MAXPOOL_ZOO))
def test_zoo_matches_average_pool_reference(name):
    size, kwargs = MAXPOOL_ZOO[name]
    model = build(name, **kwargs)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = convify.replace_maxpool(model, x[:1])
    assert isinstance(out, fx.GraphModule)
    assert pools_left(out) == []
    ref, count = avg_reference(model, x)
    assert_input_dependent(ref)
    with torch.no_grad():
        got = out(x)
        assert got.shape == model(x).shape
    assert len(convify.report(out).replaced) == count
    assert rel_err(got, ref) <= 1e-5


def test_googlenet_train_mode_keeps_aux_outputs():
    model = build("googlenet", aux_logits=True, init_weights=False).train()
    out = convify.replace_maxpool(model, torch.randn(2, 3, 96, 96))
    assert out.training
    assert pools_left(out) == []
    out.eval()  # the aux branches were fixed when the model was traced in train mode
    with torch.no_grad():
        logits, aux2, aux1 = out(torch.randn(2, 3, 96, 96))
    assert logits.shape == aux1.shape == aux2.shape == (2, 1000)


@pytest.mark.parametrize("name,size", [("vgg11", 64), ("bat_resnext26ts", 256)])
def test_timm_models_plain_fx_cannot_trace(name, size):
    """Plain symbolic_trace fails on these; convify honours timm's own leaf
    registry (and falls back to submodules where that is not enough)."""
    timm = pytest.importorskip("timm")
    model = reinit(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    x = torch.randn(2, 3, size, size)
    out = convify.replace_maxpool(model, x[:1])
    rep = convify.report(out)
    assert rep.replaced and pools_left(out) == []
    ref, _ = avg_reference(model, x)
    with torch.no_grad():
        assert rel_err(out(x), ref) <= 1e-5


def test_a_rewrite_that_is_not_exact_says_so_and_names_the_exact_mode_and_recovery():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.zeros(1, 3, 8, 8)
    for mode in ("conv", "depthwise", "fold"):
        notes = convify.report(convify.replace_maxpool(model, x, mode=mode)).notes
        said = [n for n in notes if n.startswith("not exact:")]
        assert len(said) == 1 and "mode='exact'" in said[0] and "convify.reconstruct" in said[0], (mode, notes)
    exact = convify.report(convify.replace_maxpool(model, x, mode="exact"))
    assert exact.exact and not any(n.startswith("not exact:") for n in exact.notes)
