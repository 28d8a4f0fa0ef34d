"""A non-dense head keeps the original's contract: the original's output at
the size its Linear layer was made for, or an error naming that size, never a
longer vector (convify/fx/rewrites/head/sizing.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import convify
from convify.errors import ExampleInputError, ExportError
from convify.fx.rewrites.head.sizing import check_head_size, pinned_heads

from conftest import reinit, rel_err


class FlatNet(nn.Module):
    """The issue's model: conv, max pooling, flatten, Linear(1568, 10), made for 28x28."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def flat_net() -> nn.Module:
    return reinit(FlatNet(), seed=0).eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def guards(model: nn.Module) -> int:
    return sum(n.target is check_head_size for m in model.modules() if isinstance(m, fx.GraphModule)
               for n in m.graph.nodes)


def test_a_flattened_head_refuses_another_size_as_the_original_does() -> None:
    model = flat_net()
    new = convify.convify(model, torch.randn(1, 1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    assert run(new, x).shape == (3, 10)  # the traced size, any batch
    head_only = convify.convify(model, torch.randn(1, 1, 28, 28), pool=None)
    assert rel_err(run(head_only, x), run(model, x)) <= 1e-5
    with pytest.raises(RuntimeError):
        run(model, torch.randn(1, 1, 56, 56))
    with pytest.raises(ExampleInputError, match=r"^fc: this classifier head was rewritten for a 14x14 feature map, "
                                                r"traced at the input 1x1x28x28.*this input gives a 28x28 map.*"
                                                r"example_input= of this size.*dense=True for a score map"):
        run(new, torch.randn(1, 1, 56, 56))
    with pytest.raises(ExampleInputError, match="gives a 12x12 map"):
        run(new, torch.randn(1, 1, 24, 24))  # smaller: torch's own error about the kernel before
    note = convify.report(new).replaced[-1].notes
    assert any("only on a 14x14 map" in n and "dense=True" in n for n in note)


def test_dense_and_gap_heads_are_not_guarded_and_run_at_other_sizes() -> None:
    model = flat_net()
    dense = convify.replace_linear_head(model, torch.randn(1, 1, 28, 28), dense=True)
    assert guards(dense) == 0 and run(dense, torch.randn(1, 1, 56, 56)).shape == (1, 10, 15, 15)
    for mode in ("gap", "gap_mlp"):
        gap = convify.replace_linear_head(model, torch.randn(1, 1, 28, 28), mode=mode)
        assert guards(gap) == 0 and run(gap, torch.randn(2, 1, 56, 56)).shape == (2, 10)


def test_a_map_fixed_by_an_adaptive_pooling_needs_no_guard() -> None:
    from test_head import GapNet, TinyVGG

    for model in (reinit(TinyVGG()).eval(), reinit(GapNet()).eval()):
        new = convify.replace_linear_head(model, torch.randn(1, 3, 32, 32))
        assert guards(new) == 0
        x = torch.randn(2, 3, 48, 40)  # the original works here too
        assert rel_err(run(new, x), run(model, x)) <= 1e-5


def test_a_one_by_one_map_that_nothing_fixes_is_guarded() -> None:
    model = reinit(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(4, 5))).eval()
    new = convify.replace_linear_head(model, torch.randn(1, 3, 2, 2))
    assert guards(new) == 1
    with pytest.raises(ExampleInputError, match="rewritten for a 1x1 feature map.*gives a 2x2 map"):
        run(new, torch.randn(1, 3, 4, 4))  # the original raises too (flatten gives 16 features)


def test_the_guard_survives_a_second_rewrite_and_a_copy() -> None:
    new = convify.replace_linear_head(flat_net(), torch.randn(1, 1, 28, 28))
    again = convify.replace_maxpool(new, torch.randn(1, 1, 28, 28))
    assert guards(again) == 1 and pinned_heads(again) == ["fc"]
    with pytest.raises(ExampleInputError, match="14x14 feature map"):
        run(again, torch.randn(1, 1, 56, 56))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_of_a_guarded_head_keeps_its_size_and_refuses_dynamic_spatial(tmp_path, exporter) -> None:
    ort = pytest.importorskip("onnxruntime")
    new = convify.convify(flat_net(), torch.randn(1, 1, 28, 28))
    with pytest.raises(ExportError, match=r"fc: a classifier head rewritten without dense=True.*"
                                          r"export with dynamic_spatial=False"):
        convify.export_onnx(new, tmp_path / "dyn.onnx", torch.randn(1, 1, 28, 28), dynamic_spatial=True,
                            exporter=exporter)
    path = convify.export_onnx(new, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28), exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = torch.randn(2, 1, 28, 28)
    assert rel_err(torch.from_numpy(session.run(None, {name: x.numpy()})[0]), run(new, x)) <= 1e-4
    with pytest.raises(Exception, match="(?i)invalid dimensions|index: 2"):  # the file's input shape refuses it
        session.run(None, {name: np.zeros((1, 1, 56, 56), np.float32)})
