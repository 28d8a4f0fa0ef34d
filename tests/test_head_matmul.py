"""convify.matmul_heads: the opt-in that runs a converted head's convolutions
as one GEMM on CPU, with the same parameters, outputs and exports."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convify
from convify.dense.matmul import MatmulConv2d, conv2d_as_matmul
from convify.errors import UsageError
from convify.export.census import op_census
from convify.fx import tracing

from conftest import reinit, rel_err

TOL = 1e-5


class VGGish(nn.Module):
    """conv trunk -> flatten -> Linear MLP: the head becomes a 4x4 conv and two 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Untraceable(nn.Module):
    """A forward torch.fx cannot trace (a branch on a value); its ``net`` is traced on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.net = VGGish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > float("inf"):
            return x
        return self.net(x)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def rewritten(model: nn.Module | None = None, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    model = model if model is not None else reinit(VGGish()).eval()
    return convify.replace_linear_head(model, torch.randn(1, 3, 8, 8), **kwargs), torch.randn(3, 3, 8, 8)


def head_names(model: nn.Module) -> list[str]:
    return [name for row in convify.report(model).replaced for name in row.detail.linears]


# --------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("n,size,kernel", [(1, 9, 3), (3, 9, 3), (3, 4, 4), (2, 6, 1), (1, 6, 1), (40, 5, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_as_matmul_equals_conv2d(n: int, size: int, kernel: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n * size + kernel)
    x = torch.randn(n, 8, size, size, generator=g)
    w = torch.randn(5, 8, kernel, kernel, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    want = F.conv2d(x, w, b)
    got = conv2d_as_matmul(x, w, b)
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got, want) <= TOL


# --------------------------------------------------------------------------- matmul_heads


@pytest.mark.parametrize("dense", [False, True])
def test_matmul_heads_swaps_the_head_convolutions_only(dense: bool) -> None:
    plain, x = rewritten(dense=dense)
    fast = convify.matmul_heads(plain)
    assert head_names(fast) == ["classifier.0", "classifier.3", "classifier.5"]
    assert all(type(fast.get_submodule(n)) is MatmulConv2d for n in head_names(fast))
    assert all(type(plain.get_submodule(n)) is nn.Conv2d for n in head_names(plain))  # a copy by default
    assert type(fast.get_submodule("features.0")) is nn.Conv2d
    want, got = plain.state_dict(), fast.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert rel_err(run(fast, x), run(plain, x)) <= TOL
    if dense:
        big = torch.randn(2, 3, 13, 11)
        assert rel_err(run(fast, big), run(plain, big)) <= TOL


def test_matmul_heads_inplace_shares_the_parameters() -> None:
    plain, _ = rewritten()
    weight = plain.get_submodule("classifier.0").weight
    fast = convify.matmul_heads(plain, inplace=True)
    assert fast is plain and type(plain.get_submodule("classifier.0")) is MatmulConv2d
    assert plain.get_submodule("classifier.0").weight is weight


def test_matmul_heads_keeps_train_mode_and_gradients() -> None:
    plain, x = rewritten()
    fast = convify.matmul_heads(plain.train())
    conv = fast.get_submodule("classifier.0")
    assert conv.training
    fast(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_matmul_heads_finds_heads_in_a_traced_submodule() -> None:
    """An untraceable forward: the head is rewritten in ``net``'s own graph, and its record names ``net.*``."""
    model = reinit(Untraceable()).eval()
    plain, x = rewritten(model)
    assert head_names(plain) == ["net.classifier.0", "net.classifier.3", "net.classifier.5"]
    fast = convify.matmul_heads(plain)
    assert all(type(fast.get_submodule(n)) is MatmulConv2d for n in head_names(fast))
    assert rel_err(run(fast, x), run(model, x)) <= TOL


def test_matmul_heads_needs_the_report_of_a_head_rewrite() -> None:
    with pytest.raises(UsageError, match="no convify report of a head rewrite"):
        convify.matmul_heads(reinit(VGGish()).eval())
    pooled = convify.replace_maxpool(reinit(VGGish()).eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(UsageError, match="pass the model replace_linear_head, convify or load returned"):
        convify.matmul_heads(pooled)


def test_matmul_heads_on_a_model_without_linear_heads_changes_nothing() -> None:
    fcn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    rewritten_fcn = convify.replace_linear_head(fcn, torch.randn(1, 3, 8, 8))
    fast = convify.matmul_heads(rewritten_fcn)
    assert [type(m) for m in fast.modules()] == [type(m) for m in rewritten_fcn.modules()]


def test_a_sped_up_model_retraces_and_rewrites_to_nothing_new() -> None:
    plain, x = rewritten()
    fast = convify.matmul_heads(plain)
    gm = tracing.trace(fast)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert {"classifier.0", "classifier.3", "classifier.5"} <= set(calls)
    again = convify.replace_linear_head(fast, x[:1])
    assert convify.report(again).last.replaced == ()
    assert rel_err(run(again, x), run(plain, x)) <= TOL


# --------------------------------------------------------------------------- what is exported


def test_sped_up_heads_export_as_convolutions() -> None:
    plain, x = rewritten()
    fast = convify.matmul_heads(plain)
    program = torch.export.export(fast, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("conv2d" in t for t in targets) == 4
    assert not any(op in t for t in targets for op in ("addmm", "aten.mm", "matmul", "linear"))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_sped_up_heads_are_conv_in_onnx(tmp_path, exporter: str) -> None:
    pytest.importorskip("onnx")
    plain, x = rewritten(dense=True)
    fast = convify.matmul_heads(plain)
    path = convify.export_onnx(fast, tmp_path / "fast.onnx", x, exporter=exporter)
    census = op_census(path)
    assert census.get("Conv") == 4 and not {"Gemm", "MatMul"} & set(census), census


def test_verify_compares_the_exported_conv_with_the_eager_gemm() -> None:
    pytest.importorskip("onnxruntime")
    model = reinit(VGGish()).eval()
    plain, x = rewritten(model)
    v = convify.verify(model, convify.matmul_heads(plain), x, exporter="legacy")
    assert v.passed and v.equivalence.exact, str(v)
    assert v.census_rewritten.get("Gemm", 0) + v.census_rewritten.get("MatMul", 0) == 0
