"""Whole pickled models that load where convify cannot be imported
(convify/fx/portable.py, convify.io.save_pickled)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import convify
from convify import io as ck
from convify.errors import ExampleInputError
from convify.fx import tracing
from convify.fx.portable import convify_names, portable

from cli_factories import tiny_net
from conftest import reinit

#: Loads a whole pickle in a fresh Python where importing convify raises, runs
#: it on zeros of each shape given, and prints the output shapes or the errors.
LOAD_WITHOUT_CONVIFY = r"""
import importlib.abc, json, sys

class NoConvify(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "convify":
            raise ImportError(f"convify cannot be imported here ({name})")
        return None

sys.meta_path.insert(0, NoConvify())
import torch

model = torch.load(sys.argv[1], weights_only=False)
results = []
for shape in sys.argv[2:]:
    try:
        with torch.no_grad():
            results.append(list(model(torch.zeros(*map(int, shape.split(",")))).shape))
    except Exception as e:
        results.append(f"{type(e).__name__}: {e}")
print(json.dumps({"results": results, "report": type(getattr(model, "_convify_report", None)).__name__,
                  "convify_loaded": any(m.split(".")[0] == "convify" for m in sys.modules)}))
"""


def load_without_convify(path: Path, *shapes: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CONVIFY, str(path), *shapes], capture_output=True,
                          text=True, timeout=300, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_rewritten_model_pickled_by_save_pickled_loads_without_convify(tmp_path):
    rewritten = convify.convify(reinit(tiny_net(), seed=1).eval(), torch.zeros(1, 3, 16, 16))
    ck.save_pickled(rewritten, tmp_path / "whole.pt")
    got = load_without_convify(tmp_path / "whole.pt", "2,3,16,16", "1,3,32,32")
    assert got["results"][0] == [2, 10] and not got["convify_loaded"] and got["report"] == "dict"
    assert got["results"][1].startswith("AssertionError: 8: this classifier head was rewritten for a 4x4 feature "
                                        "map, traced at the input 1x3x16x16")
    back = torch.load(tmp_path / "whole.pt", weights_only=False)  # here, with convify: the report reads back
    assert convify.report(back) == convify.report(rewritten)
    with pytest.raises(ExampleInputError):  # the model in memory keeps convify's error
        rewritten(torch.zeros(1, 3, 32, 32))


class ShapeBranches(nn.Module):
    """A forward that branches on shapes, turns one into a number and takes a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("three channels")
        width = int(x.shape[-1])
        return self.conv(x)[..., : width // 2] * scale


def test_tracing_guards_become_plain_torch_with_their_messages():
    gm = tracing.trace(ShapeBranches(), args=(torch.zeros(1, 3, 8, 8),))
    kinds = {n.target for n in gm.graph.nodes if n.target in tracing.GUARDS}
    assert kinds == {tracing.check_traced_argument, tracing.check_traced_branch, tracing.check_traced_value}
    plain = portable(gm)
    assert plain is not gm and not any(n.target in tracing.GUARDS for n in plain.graph.nodes)
    assert gm.graph is not plain.graph and any(n.target in tracing.GUARDS for n in gm.graph.nodes)  # a copy
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(plain(x), gm(x))
    for bad, error in [((torch.zeros(1, 4, 8, 8),), "another branch of its forward"),
                       ((torch.zeros(1, 3, 8, 6),), "turns a shape into a number, 8 on the example input"),
                       ((x, 3.0), "rewritten with scale=2.0 and computes only that")]:
        with pytest.raises(convify.ConvifyError, match=error):
            gm(*bad)
        with pytest.raises(AssertionError, match=error):
            plain(*bad)
    assert convify_names(gm) == []  # its guards are written as plain torch



def test_a_model_without_guards_is_pickled_as_it_is():
    rewritten = convify.replace_maxpool(reinit(tiny_net()).eval(), torch.zeros(1, 3, 16, 16))
    assert portable(rewritten) is rewritten and convify_names(rewritten) == []
    assert rewritten._tracer_cls is None  # torch.fx's own tracer re-traces its code when unpickled


def test_what_cannot_leave_convify_is_named():
    timm = pytest.importorskip("timm")
    from timm.layers.pool2d_same import MaxPool2dSame

    model = nn.Sequential(nn.Conv2d(3, 4, 3), MaxPool2dSame(3, 2), nn.Conv2d(4, 4, 1)).eval()
    rewritten = convify.replace_maxpool(model, torch.zeros(1, 3, 15, 15))
    assert timm and any(n.startswith("convify.fx.rewrites.maxpool.same.PadSame") for n in convify_names(rewritten))


def test_a_graph_that_rebuilds_a_model_output_keeps_convifys_tracer_and_says_so(tmp_path):
    pytest.importorskip("transformers")
    from test_hf import X, hf_resnet

    rewritten = convify.convify(hf_resnet(), torch.randn(X))
    assert any("ConvifyTracer (the tracer of a graph that rebuilds a ModelOutput)" in n
               for n in convify_names(rewritten))
    ck.save_pickled(rewritten, tmp_path / "hf.pt")
    assert type(torch.load(tmp_path / "hf.pt", weights_only=False)(torch.randn(X))).__name__ == type(
        rewritten(torch.randn(X))).__name__
