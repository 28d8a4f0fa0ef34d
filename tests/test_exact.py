"""``mode="exact"``: max pooling as convolutions and ReLUs that compute it exactly.

Random pools in float64 (every dimension, padding, dilation, ceil_mode,
non-square windows, signed and non-negative inputs, module and functional
calls, timm's "same" pools) at the traced size and others; the torchvision
zoo in float32; no max op runs; ONNX; gradients; the record and the report;
``convify.convify`` and a checkpoint round trip.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import convify
from convify.core.maxtree import TreeForm
from convify.core.rewrites.maxpool import EXACT, POOL_MODES, ExactTree, PoolParams, PoolRecord
from convify.core.weights import pool_output_size
from convify.export.census import op_census
from convify.fx.rewrites.maxpool.chain import CLASS_NAME
from convify.fx.rewrites.maxpool.exact import empty_window_reason, exact_tree

from cli_factories import tiny_net
from conftest import reinit, rel_err

POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
FUNCTIONS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
MAX_OPS_ONNX = ("MaxPool", "Max", "ReduceMax", "TopK", "ArgMax")


class Functional(nn.Module):
    def __init__(self, dims, kernel, stride, padding, dilation, ceil_mode, relu):
        super().__init__()
        self.dims, self.args, self.relu = dims, (kernel, stride, padding, dilation, ceil_mode), relu

    def forward(self, x):
        return FUNCTIONS[self.dims](x.relu() if self.relu else x, *self.args)


def random_pool(seed: int) -> tuple[int, tuple, tuple, tuple, tuple, bool]:
    """A pooling PyTorch accepts: non-square windows, padding, dilation, ceil_mode."""
    r = random.Random(seed)
    dims = 1 + seed % 3
    kernel = tuple(r.randint(1, 4) for _ in range(dims))
    dilation = tuple(r.choice((1, 1, 2, 3)) for _ in range(dims))
    stride = tuple(r.randint(1, 3) for _ in range(dims))
    padding = tuple(r.randint(0, k // 2) for k in kernel)  # PyTorch's limit
    return dims, kernel, stride, padding, dilation, r.random() < 0.5


def size_with_valid_windows(params: PoolParams, r: random.Random, low: int, high: int) -> tuple[int, ...]:
    """Lengths from ``low`` to ``high`` past the smallest that gives an output."""
    for _ in range(100):
        size = tuple(max(1, d * (k - 1) + 1 - 2 * p) + r.randint(low, high) for k, p, d in
                     zip(params.kernel, params.padding, params.dilation))
        outputs = [pool_output_size(n, k, s, p, d, params.ceil_mode) for n, k, s, p, d in
                   zip(size, params.kernel, params.stride, params.padding, params.dilation)]
        if min(outputs) >= 1 and empty_window_reason(params, size) is None:
            return size
    raise AssertionError("no size without an all-padding window")


@pytest.mark.parametrize("seed", range(48))
def test_random_pools_are_exact_in_float64_at_every_size(seed):
    dims, kernel, stride, padding, dilation, ceil_mode = random_pool(seed)
    nonnegative, functional = seed % 2 == 0, seed % 4 < 2
    params = PoolParams.of(dims, kernel, stride, padding, dilation, ceil_mode, False)
    if functional:
        model = Functional(dims, kernel, stride, padding, dilation, ceil_mode, nonnegative)
    else:
        pool = POOLS[dims](kernel, stride, padding, dilation, ceil_mode=ceil_mode)
        model = nn.Sequential(nn.ReLU(), pool) if nonnegative else nn.Sequential(pool)
    r = random.Random(seed)
    traced = size_with_valid_windows(params, r, 0, 6)
    out = convify.replace_maxpool(model, torch.zeros(1, 2, *traced, dtype=torch.float64), mode="exact")
    row, = convify.report(out).replaced
    assert row.exact and row.detail.tree.signed is not nonnegative
    for size in (traced, size_with_valid_windows(params, r, 0, 9), size_with_valid_windows(params, r, 7, 12)):
        x = torch.randn(3, 2, *size, dtype=torch.float64) * 10
        with torch.no_grad():
            want, got = model(x), out(x)
        assert got.shape == want.shape and rel_err(got, want) <= 1e-12, (params, size)


def test_a_window_of_padding_only_at_the_traced_size_is_skipped_with_the_reason():
    model = nn.Sequential(nn.MaxPool1d(2, 1, padding=1, dilation=3))
    out = convify.replace_maxpool(model, torch.zeros(1, 2, 2), mode="exact")
    skipped, = convify.report(out).skipped
    assert "window 0 holds padding only" in skipped.reason and "trace it at a larger size" in skipped.reason
    assert isinstance(out.get_submodule("0"), nn.MaxPool1d)


@pytest.mark.parametrize("k,s,d", [(3, 2, 1), (2, 2, 1), (3, 1, 1), (2, 3, 1), (3, 2, 2), (4, 1, 3)])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_timm_same_pools_are_exact_at_every_size(k, s, d, nonnegative):
    from timm.layers.pool2d_same import MaxPool2dSame
    model = nn.Sequential(*([nn.ReLU()] if nonnegative else []), MaxPool2dSame(k, s, dilation=d)).double()
    out = convify.replace_maxpool(model, torch.zeros(1, 3, 15, 15, dtype=torch.float64), mode="exact")
    assert convify.report(out).replaced[-1].exact
    params = convify.report(out).replaced[-1].detail.params
    assert params.same
    for h, w in [(15, 15), (16, 17), (9, 22), (2 * d * k, 5 + d * k)]:
        assert empty_window_reason(params, (h, w)) is None
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        with torch.no_grad():
            assert rel_err(out(x), model(x)) <= 1e-12


def test_a_dilated_same_pool_on_an_axis_shorter_than_its_dilation():
    """TapPad takes the first and last d elements from a copy edge-padded by
    d - 1: on an axis shorter than d those copies reach no valid tap."""
    from timm.layers.pool2d_same import MaxPool2dSame
    model = nn.Sequential(MaxPool2dSame(3, 2, dilation=3)).double()
    out = convify.replace_maxpool(model, torch.zeros(1, 2, 15, 15, dtype=torch.float64), mode="exact")
    params = convify.report(out).replaced[0].detail.params
    checked = []
    for w in range(1, 7):
        if empty_window_reason(params, (9, w)) is None:
            x = torch.randn(2, 2, 9, w, dtype=torch.float64)
            with torch.no_grad():
                assert rel_err(out(x), model(x)) <= 1e-12, w
            checked.append(w)
    assert 2 in checked and len(checked) >= 3  # 2 < d: a valid window on an axis shorter than d


def test_a_shared_pool_becomes_one_tree_per_call_site():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.pool(self.conv(self.pool(x).relu()))

    model = Twice().double()
    out = convify.replace_maxpool(model, torch.zeros(1, 4, 16, 16, dtype=torch.float64), mode="exact")
    rows = convify.report(out).replaced
    assert [(r.name, r.module, r.detail.tree.signed) for r in rows] == [("pool", "pool", True),
                                                                       ("pool@1", "pool@1", True)]
    assert out.get_submodule("pool") is not out.get_submodule("pool@1")
    x = torch.randn(2, 4, 21, 18, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-12


def test_non_negative_site_is_depthwise_convolutions_with_zeros_inside():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    out = convify.replace_maxpool(model, torch.zeros(1, 3, 12, 12), mode="exact")
    tree = out.get_submodule("2")
    assert isinstance(tree, torch.fx.GraphModule) and type(tree).__name__ == CLASS_NAME and not hasattr(tree, "pad")
    convs = [m for m in tree.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert {type(m) for m in tree.modules()} == {type(tree), nn.Module, nn.Conv2d}
    assert not [m for m in out.modules() if type(m).__module__.startswith("convify")]  # pickles without convify
    assert all(c.groups == c.in_channels == c.out_channels == 4 for c in convs)  # one channel in, one out
    assert [c.padding for c in convs] == [(0, 1)] * 3 + [(1, 0)] * 3  # zeros inside the convolutions
    record = convify.report(out).replaced[0].detail.tree
    assert not record.signed and record.sign_proof == "_1" and record.channels == (1,) * 6
    assert record.form is TreeForm.CHAIN and record.relu_levels == 4


def test_the_separable_form_at_a_non_negative_site_is_convolutions_and_relus_only():
    """The form without additions (for verifiers that take no Add) stays one call away."""
    params = PoolParams.of(2, 3, 2, 1, 1, False, False)
    tree, _ = exact_tree(params, 4, signed=False, form=TreeForm.SEPARABLE, dtype=torch.float64)
    assert {type(m) for m in tree} == {nn.Conv2d, nn.ReLU}
    assert tree[0].padding == (0, 1) and tree[4].padding == (1, 0)
    x = torch.rand(2, 4, 12, 11, dtype=torch.float64)
    assert rel_err(tree(x), params.pool(x)) <= 1e-12


def test_signed_site_replicates_borders_with_one_channel_per_value():
    out = convify.replace_maxpool(nn.Sequential(nn.MaxPool2d(3, 2, 1)), torch.zeros(1, 4, 12, 12), mode="exact")
    tree = out.get_submodule("0")
    assert isinstance(tree.pad, nn.ReplicationPad2d) and tree.pad.padding == (1, 1, 1, 1)
    assert convify.report(out).replaced[0].detail.tree.channels == (1,) * 6  # values carried by additions
    tree, _ = exact_tree(PoolParams.of(2, 3, 2, 1, 1, False, False), 4, signed=True, form=TreeForm.SEPARABLE,
                         dtype=torch.float32)
    assert [m.out_channels // m.groups for m in tree if isinstance(m, nn.Conv2d)] == [5, 3, 5, 3, 1]


# --------------------------------------------------------------------------- record and report


def test_record_and_report_say_exact_layers_channels_sign_parameters_and_macs():
    model = tiny_net()
    out = convify.replace_maxpool(model, torch.zeros(1, 3, 16, 16), mode="exact", init="kaiming")
    rep = convify.report(out)
    row = rep.replaced[0]
    assert row.exact and rep.exact and isinstance(row.detail, PoolRecord) and row.detail.conv is None
    tree = row.detail.tree
    assert isinstance(tree, ExactTree) and tree.form is TreeForm.CHAIN and tree.relu_levels == 2
    assert tree.channels == (1, 1, 1, 1)  # 2x2 window: per axis relu(a - b), then b + that
    assert tree.parameters == sum(p.numel() for p in out.get_submodule("3").parameters()) == 8 * 2 * 4
    assert tree.macs == 2 * 8 * 16 * 8 * 2 + 2 * 8 * 8 * 8 * 2  # 1x2 convolutions at 16x8, then 2x1 at 8x8
    assert row.new == "exact max tree (chain, 2 ReLU levels, >=0)"
    text = str(rep)
    assert "exact max tree" in text and "+64 parameters" in text and "input >= 0 (_2)" in text
    assert "init='kaiming' does not apply to mode='exact'" in text
    assert rep.to_dict()["passes"][0]["replaced"][0]["detail"]["tree"]["type"] == "ExactTree"
    assert not POOL_MODES["exact"].learned and EXACT.name == "exact"


def test_both_forms_are_exact():
    params = PoolParams.of(2, (3, 2), (2, 1), (1, 0), (1, 2), True, False)
    x = torch.randn(2, 5, 11, 13, dtype=torch.float64)
    for signed in (True, False):
        for form in TreeForm:
            tree, _ = exact_tree(params, 5, signed=signed, form=form, dtype=torch.float64)
            inp = x if signed else x.relu()
            assert rel_err(tree(inp), params.pool(inp)) <= 1e-12, (signed, form)


# --------------------------------------------------------------------------- the zoo


def site_errors(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Each exact site's relative error against the max pooling of what reached it."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = convify.report(model).replaced
    hooks = [model.get_submodule(r.module).register_forward_hook(
        lambda mod, args, out, name=r.name: seen.__setitem__(name, (args[0], out))) for r in rows]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [rel_err(seen[r.name][1], r.detail.params.pool(seen[r.name][0])) for r in rows]


@pytest.mark.parametrize("name,size,other", [("resnet18", 64, (80, 96)), ("vgg11", 64, (96, 80)),
                                             ("googlenet", 96, (112, 128))])
def test_torchvision_models_match_the_original(name, size, other):
    """Every site within 1e-6 in float32 and the whole network within 1e-12 in float64,
    at the traced size and another; in float32 the network's output differs by its own
    rounding (the original's float32 output is as far from its float64 one)."""
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = reinit(getattr(torchvision.models, name)(weights=None, **kwargs)).eval()
    out = convify.replace_maxpool(model, torch.zeros(1, 3, size, size), mode="exact")
    rep = convify.report(out)
    assert rep.replaced and rep.exact and not rep.skipped
    for shape in [(2, 3, size, size), (1, 3, *other)]:
        x = torch.randn(*shape)
        assert max(site_errors(out, x)) <= 1e-6
        with torch.no_grad():
            assert rel_err(out(x), model(x)) <= 1e-5
            assert rel_err(out.double()(x.double()), model.double()(x.double())) <= 1e-12
        out.float(), model.float()


# --------------------------------------------------------------------------- what runs


class Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


class AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def maxes(model: nn.Module, x: torch.Tensor) -> list[str]:
    calls, aten = Calls(), AtenCalls()
    with torch.no_grad(), calls, aten:
        model(x)
    return [n for n in calls.names + aten.names if "max" in n.lower() or "topk" in n.lower()]


def test_no_max_op_runs_in_the_rewritten_model():
    from timm.layers.pool2d_same import MaxPool2dSame

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.MaxPool2d(3, 2, 1, dilation=1, ceil_mode=True), nn.MaxPool2d(2, 1, 1, dilation=2)
            self.c = MaxPool2dSame(3, 2)

        def forward(self, x):
            return F.max_pool2d(self.c(self.b(self.a(x)) - 1).relu(), 2)

    model = Mixed()
    x = torch.randn(1, 3, 17, 19)
    assert maxes(model, x)  # the counter sees max pooling where it runs
    out = convify.replace_maxpool(model, x, mode="exact")
    assert len(convify.report(out).replaced) == 4
    assert maxes(out, x) == []
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-6


def test_gradients_reach_the_new_layers():
    out = convify.replace_maxpool(tiny_net(), torch.zeros(1, 3, 16, 16), mode="exact").train()
    out(torch.randn(2, 3, 16, 16)).square().sum().backward()
    tree = out.get_submodule("3")
    convs = [m for m in tree.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


# --------------------------------------------------------------------------- ONNX


def onnx_matches(tmp_path, model: nn.Module, x: torch.Tensor, sites: int, exporter: str,
                 sizes: list[tuple[int, ...]]) -> None:
    import onnxruntime as ort
    out = convify.replace_maxpool(model, x, mode="exact")
    assert len(convify.report(out).replaced) == sites
    path = convify.export_onnx(out, tmp_path / "exact.onnx", x, dynamic_spatial=True, exporter=exporter)
    census = op_census(path)
    assert not [op for op in MAX_OPS_ONNX if census.get(op)], census
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in sizes:
        y = torch.randn(2, x.shape[1], *size)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: y.numpy()})[0])
        with torch.no_grad():
            assert rel_err(got, model(y)) <= 1e-5, size


EXPORTERS = [pytest.param("dynamo", marks=pytest.mark.slow), "legacy"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_has_no_max_and_matches_at_other_sizes(tmp_path, exporter):
    """Signed ceil_mode, signed dilated (TapPad), signed "same", non-negative ceil_mode."""
    from timm.layers.pool2d_same import MaxPool2dSame
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(4, 4, 1),
                          nn.MaxPool2d(2, 1, 1, dilation=2), MaxPool2dSame(3, 2), nn.ReLU(),
                          nn.MaxPool2d(2, 2, ceil_mode=True)).eval()
    onnx_matches(tmp_path, model, torch.randn(1, 3, 19, 21), 4, exporter, [(19, 21), (24, 17), (31, 30)])


class SameAndFunctional(nn.Module):
    """Non-negative dilated "same" (zeros), signed "same" whose window is
    shorter than its stride (its padding may be zero: no max in the size
    arithmetic), and a functional non-square dilated ceil_mode pool."""

    def __init__(self):
        super().__init__()
        from timm.layers.pool2d_same import MaxPool2dSame
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)
        self.pool1, self.pool2 = MaxPool2dSame(3, 2, dilation=2), MaxPool2dSame(2, 3)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x).relu())))
        return F.max_pool2d(x, (3, 2), (1, 2), (1, 0), (2, 1), ceil_mode=True)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_of_same_and_functional_pools(tmp_path, exporter):
    onnx_matches(tmp_path, SameAndFunctional().eval(), torch.randn(1, 3, 40, 43), 3, exporter,
                 [(40, 43), (52, 37), (61, 60)])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_of_a_dilated_same_pool_on_a_signed_input(tmp_path, exporter):
    """Its padding repeats d elements by slices whose lengths follow the size
    (``narrow``: no bound the exporter has to clamp with ``Max``)."""
    from timm.layers.pool2d_same import MaxPool2dSame
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MaxPool2dSame(3, 2, dilation=2)).eval()
    onnx_matches(tmp_path, model, torch.randn(1, 3, 19, 21), 1, exporter, [(19, 21), (24, 17), (31, 30)])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("dims", [1, 3])
def test_onnx_of_1d_and_3d_pools(tmp_path, exporter, dims):
    conv = nn.Conv1d if dims == 1 else nn.Conv3d
    pool = (nn.MaxPool1d(3, 2, 1, dilation=2, ceil_mode=True) if dims == 1 else
            nn.MaxPool3d((2, 3, 3), (1, 2, 2), 1, dilation=(2, 1, 1), ceil_mode=True))
    model = nn.Sequential(conv(3, 4, 3), pool, nn.ReLU(), POOLS[dims](2)).eval()
    sizes = [(21,), (30,), (17,)] if dims == 1 else [(9, 12, 11), (12, 9, 14)]
    onnx_matches(tmp_path, model, torch.randn(1, 3, *sizes[0]), 2, exporter, sizes)


# --------------------------------------------------------------------------- convify() and checkpoints


def test_convify_and_a_checkpoint_rebuild_the_same_layers(tmp_path):
    model = reinit(tiny_net(), seed=3).eval()
    new = convify.convify(model, torch.zeros(1, 3, 16, 16), pool="exact")
    assert convify.report(new).passes[0].options["mode"] == "exact"
    path = convify.save(new, tmp_path / "exact.pt", arch="cli_factories:tiny_net")
    back = convify.load(path, trust_code=True)
    rows = lambda m: [(r.rewrite, r.name, r.new, r.exact, r.detail) for r in convify.report(m).replaced]
    assert rows(back) == rows(new)
    want_sd, got_sd = new.state_dict(), back.state_dict()
    assert list(got_sd) == list(want_sd) and all(torch.equal(got_sd[k], v) for k, v in want_sd.items())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(back(x), model(x)) <= 1e-6 and rel_err(new(x), model(x)) <= 1e-6


# --------------------------------------------------------------------------- the sign proof


class Cat(nn.Module):
    def __init__(self, left: nn.Module, right: nn.Module):
        super().__init__()
        self.left, self.right, self.pool = left, right, nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(torch.cat([self.left(x), self.right(x)], 1))


@pytest.mark.parametrize("before,proven", [
    (nn.ReLU(), True), (nn.ReLU6(), True), (nn.Hardtanh(0.0, 1.0), True), (nn.Hardtanh(-1.0, 1.0), False),
    (nn.Sigmoid(), True), (nn.Softplus(), True), (nn.Softplus(beta=-1.0), False), (nn.Tanh(), False),
    (nn.Sequential(nn.ReLU(), nn.Dropout(0.5)), True), (nn.Sequential(nn.ReLU(), nn.Identity()), True),
    (nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 1, 1)), True), (nn.Sequential(nn.Tanh(), nn.Dropout()), False),
    (nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 1)), False), (nn.Identity(), False),
    (Cat(nn.ReLU(), nn.Sigmoid()), True), (Cat(nn.ReLU(), nn.Tanh()), False),
])
def test_sign_proof_both_ways(before, proven):
    pool = nn.MaxPool2d(2)
    model = before if isinstance(before, Cat) else nn.Sequential(before, pool)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    out = convify.replace_maxpool(model.double().eval(), x, mode="exact")
    rows = convify.report(out).replaced
    last = rows[-1].detail.tree
    assert last.signed is not proven and (last.sign_proof is not None) is proven
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-12


class FunctionalSign(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        return F.max_pool2d(self.how(x), 2)


@pytest.mark.parametrize("how,proven", [
    (F.relu, True), (lambda x: x.relu(), True), (torch.sigmoid, True), (F.relu6, True),
    (lambda x: F.hardtanh(x, 0.0, 2.0), True), (F.hardtanh, False), (lambda x: F.softplus(x, beta=2.0), True),
    (lambda x: F.dropout(F.relu(x), 0.1, False), True), (lambda x: F.relu(x) - 1, False), (torch.tanh, False),
])
def test_sign_proof_of_functional_calls(how, proven):
    out = convify.replace_maxpool(FunctionalSign(how), torch.randn(1, 2, 8, 8), mode="exact")
    assert convify.report(out).replaced[0].detail.tree.signed is not proven


def test_sign_proof_reads_the_graph_before_any_site_is_rewritten():
    """googlenet's shape: a pool reading a pool reading a ReLU; both proven."""
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1, 1, ceil_mode=True))
    out = convify.replace_maxpool(model, torch.randn(1, 2, 12, 12), mode="exact")
    assert [r.detail.tree.sign_proof for r in convify.report(out).replaced] == ["_0", "_0"]


def test_the_command_line_writes_an_exact_checkpoint_that_loads_back_the_same_function(tmp_path, capsys):
    from convify.cli import main

    out = tmp_path / "exact.pt"
    code = main(["rewrite", "--arch", "cli_factories:tiny_net", "--input-shape", "1,3,16,16", "--pool", "exact",
                 "--head", "none", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "exact max tree" in capsys.readouterr().out
    back = convify.load(out, trust_code=True)
    rep = convify.report(back)
    assert rep.passes[0].options["mode"] == "exact" and rep.exact and len(rep.replaced) == 2
    model = tiny_net().eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(back(x), model(x)) <= 1e-5
