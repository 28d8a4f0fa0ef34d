"""convify.export_onnx: one self-contained checked file, written atomically,
dynamic batch and spatial axes under both exporters, the dynamo -> legacy
fallback, and a quiet exporter."""
from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convify
import convify.api
import convify.export.onnx as conv_onnx
from convify.errors import ExportError
from convify.export.census import op_census
from convify.export.onnx import ExportFallbackWarning, export

from conftest import assert_input_dependent, reinit, rel_err
from zoo import build


class TinyNet(nn.Module):
    """conv -> ceil_mode max pool -> conv -> global pool -> Linear (a classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyFCN(nn.Module):
    """Fully convolutional, two ceil_mode pools: output size follows the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.pool2 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.score = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        return self.score(self.pool2(F.relu(self.conv2(x))))


def tiny(cls: type[nn.Module] = TinyNet) -> nn.Module:
    return reinit(cls()).eval()


def run_ort(path, *arrays: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: a.numpy() for n, a in zip(names, arrays)})]


def assert_self_contained(path) -> None:
    """One file: every initializer embedded, nothing else in the directory."""
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    proto = onnx.load(str(path), load_external_data=False)
    assert proto.graph.initializer, "no weights in the file"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)


def input_dims(path) -> list[int | str]:
    proto = onnx.load(str(path), load_external_data=False)
    return [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]


# --------------------------------------------------------------------------- one checked file


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_export_writes_one_checked_file_that_matches_eager(tmp_path, exporter, capfd):
    model, x = tiny(), torch.randn(1, 3, 20, 20)
    path = convify.export_onnx(model, tmp_path / "tiny.onnx", x, exporter=exporter)
    assert path == tmp_path / "tiny.onnx"
    assert_self_contained(path)
    batch = torch.randn(4, 3, 20, 20)
    (got,) = run_ort(path, batch)
    want = model(batch).detach()
    assert_input_dependent(want)
    assert rel_err(got, want) <= 1e-5
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"export was not quiet: {out[:200]!r} {err[:200]!r}"


def test_export_reports_the_exporter_it_used(tmp_path):
    result = export(tiny(), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), exporter="legacy")
    assert result.exporter == "legacy" and result.fallback_reason is None
    assert result.path.exists() and result.external_data is None


def test_verbose_lets_the_dynamo_exporter_speak(tmp_path, capfd):
    convify.export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), verbose=True)
    out, err = capfd.readouterr()
    assert "torch.onnx" in out + err


def test_export_creates_missing_parent_directories(tmp_path):
    path = convify.export_onnx(tiny(), tmp_path / "a" / "b" / "m.onnx", torch.randn(1, 3, 16, 16), exporter="legacy")
    assert path.exists()


def test_export_probes_the_example_input_when_none_is_given(tmp_path):
    path = convify.export_onnx(tiny(), tmp_path / "m.onnx", exporter="legacy")
    assert input_dims(path)[1] == 3


def test_export_to_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="is a directory"):
        convify.export_onnx(tiny(), tmp_path, torch.randn(1, 3, 16, 16))


def test_unknown_exporter_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="exporter must be 'dynamo' or 'legacy'"):
        convify.export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), exporter="torchscript")
    assert not list(tmp_path.iterdir())


def test_example_input_the_model_rejects_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="does not run on the example input.*1x5x16x16"):
        convify.export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(1, 5, 16, 16))
    assert not list(tmp_path.iterdir())


def test_models_over_two_gigabytes_keep_one_side_file(tmp_path, monkeypatch):
    # Building a real 2 GB model is too slow for a test: lower the limit instead.
    monkeypatch.setattr(conv_onnx, "PROTOBUF_LIMIT", 1000)
    model, x = tiny(), torch.randn(2, 3, 16, 16)
    result = export(model, tmp_path / "big.onnx", x, exporter="legacy")
    assert result.external_data == tmp_path / "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    onnx.checker.check_model(str(result.path), full_check=True)
    (got,) = run_ort(result.path, x)
    assert rel_err(got, model(x).detach()) <= 1e-5


# --------------------------------------------------------------------------- atomic writes


def _failing_export(*args, **kwargs):
    f = args[2] if len(args) > 2 else kwargs["f"]
    with open(f, "wb") as fh:  # a partial file, as a crashing exporter may leave
        fh.write(b"partial")
    raise RuntimeError("exporter exploded")


def test_failed_export_leaves_an_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the previous good export")
    monkeypatch.setattr(torch.onnx, "export", _failing_export)
    with pytest.raises(ExportError, match=r"dynamo exporter failed \(RuntimeError: exporter exploded\) and so "
                                          r"did the legacy one"):
        convify.export_onnx(tiny(), path, torch.randn(1, 3, 16, 16))
    assert path.read_bytes() == b"the previous good export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "temporary files were left behind"


def test_failed_export_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", _failing_export)
    with pytest.raises(ExportError):
        convify.export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), exporter="legacy")
    assert not list(tmp_path.iterdir())


def test_checker_failure_is_an_export_error_and_writes_nothing(tmp_path, monkeypatch):
    def broken(proto, full_check=False):
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(ExportError, match="does not pass onnx.checker.*topologically sorted"):
        convify.export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), exporter="legacy")
    assert not list(tmp_path.iterdir())


def test_dynamo_failure_falls_back_to_legacy_and_says_why(tmp_path, monkeypatch, caplog):
    real = torch.onnx.export

    def dynamo_breaks(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("Unsupported: data-dependent control flow")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    model, x = tiny(), torch.randn(1, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="convify.export.onnx"), \
            pytest.warns(ExportFallbackWarning, match="dynamo exporter failed on TinyNet .*data-dependent control"):
        result = export(model, tmp_path / "m.onnx", x)
    assert result.exporter == "legacy"
    assert "data-dependent control flow" in result.fallback_reason
    assert "legacy" in caplog.text
    assert_self_contained(result.path)


# --------------------------------------------------------------------------- dynamic axes


def test_dynamic_batch_is_the_default_and_can_be_turned_off(tmp_path):
    model, x = tiny(), torch.randn(1, 3, 16, 16)
    dyn = convify.export_onnx(model, tmp_path / "dyn.onnx", x, exporter="legacy")
    assert input_dims(dyn) == ["batch", 3, 16, 16]
    for n in (1, 3, 5):
        batch = torch.randn(n, 3, 16, 16)
        assert rel_err(run_ort(dyn, batch)[0], model(batch).detach()) <= 1e-5
    static = convify.export_onnx(model, tmp_path / "static.onnx", x, exporter="legacy", dynamic_batch=False)
    assert input_dims(static) == [1, 3, 16, 16]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_dynamic_spatial_runs_a_rewritten_fcn_at_odd_sizes(tmp_path, exporter):
    model = tiny(TinyFCN)
    rewritten = convify.replace_maxpool(model, torch.randn(1, 3, 24, 24))
    path = convify.export_onnx(rewritten, tmp_path / "fcn.onnx", torch.randn(1, 3, 24, 24), exporter=exporter,
                               dynamic_spatial=True)
    assert "MaxPool" not in op_census(path)  # dynamo folds the F.pad into the Conv's pads
    assert input_dims(path) == ["batch", 3, "height", "width"]
    for n, h, w in ((2, 24, 24), (1, 17, 17), (3, 21, 30), (2, 33, 19)):
        x = torch.randn(n, 3, h, w)
        (got,) = run_ort(path, x)
        want = rewritten(x).detach()
        assert got.shape == want.shape, (h, w)
        assert rel_err(got, want) <= 1e-5, (h, w)


def test_dynamic_spatial_on_a_squeezenet_with_ceil_mode_pools(tmp_path):
    """A convify GraphModule: its F.pad + Conv (from the ceil_mode pools) stays
    right at sizes other than the traced one (dynamo: see the TinyFCN test)."""
    model = build("squeezenet1_1")
    rewritten = convify.replace_maxpool(model, torch.randn(1, 3, 67, 67))
    assert isinstance(rewritten, torch.fx.GraphModule)
    path = convify.export_onnx(rewritten, tmp_path / "sq.onnx", torch.randn(1, 3, 67, 67), dynamic_spatial=True,
                               exporter="legacy")
    assert op_census(path).get("MaxPool", 0) == 0
    for size in (67, 64, 71):
        x = torch.randn(2, 3, size, size)
        assert rel_err(run_ort(path, x)[0], rewritten(x).detach()) <= 1e-5, size


def test_axes_an_exporter_pinned_are_a_clear_error(tmp_path):
    model, x = tiny(), torch.randn(1, 3, 16, 16)
    path = convify.export_onnx(model, tmp_path / "m.onnx", x, exporter="legacy", dynamic_batch=False)
    spec = conv_onnx._AxesSpec.build(model, (x,), True, True)
    with pytest.raises(ExportError, match=r"input 'input' was exported with a fixed size on axes \[0, 2, 3\]"):
        conv_onnx._check_dynamic(onnx.load(str(path)), spec)


# --------------------------------------------------------------------------- census


def test_op_census_counts_op_types(tmp_path):
    path = convify.export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), exporter="legacy")
    census = op_census(path)
    assert census["Conv"] == 2 and census["MaxPool"] == 1 and census["Gemm"] == 1
    rewritten = convify.replace_maxpool(tiny(), torch.randn(1, 3, 16, 16))
    after = op_census(convify.export_onnx(rewritten, tmp_path / "r.onnx", torch.randn(1, 3, 16, 16),
                                          exporter="legacy"))
    assert after["Conv"] == 3 and "MaxPool" not in after


def test_multiple_inputs_and_outputs(tmp_path):
    class TwoInTwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(2, 4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x) + self.b(y), self.a(x).mean((2, 3))

    model = tiny(TwoInTwoOut)
    x, y = torch.randn(1, 3, 10, 10), torch.randn(1, 2, 10, 10)
    path = convify.export_onnx(model, tmp_path / "m.onnx", (x, y), exporter="legacy")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1"]
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1"]
    x3, y3 = torch.randn(3, 3, 10, 10), torch.randn(3, 2, 10, 10)
    got = run_ort(path, x3, y3)
    for g, w in zip(got, model(x3, y3)):
        assert rel_err(g, w.detach()) <= 1e-5
    assert np.isfinite(got[0].numpy()).all()


@pytest.mark.skipif(not hasattr(convify.api, "replace_linear_head"), reason="replace_linear_head is not there yet")
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_dense_convify_runs_at_odd_sizes_in_onnxruntime(tmp_path, exporter):
    """convify(dense=True) on a ceil_mode-pool classifier: one fully convolutional
    graph whose score map follows the input size, odd sizes included."""
    model = tiny()
    fcn = convify.convify(model, torch.randn(1, 3, 16, 16), dense=True)
    path = convify.export_onnx(fcn, tmp_path / "fcn.onnx", torch.randn(1, 3, 16, 16), exporter=exporter,
                               dynamic_spatial=True)
    census = op_census(path)
    assert not {"MaxPool", "Gemm", "MatMul"} & set(census), census
    shapes = set()
    for n, h, w in ((1, 16, 16), (2, 17, 23), (1, 31, 31)):
        x = torch.randn(n, 3, h, w)
        (got,) = run_ort(path, x)
        want = fcn(x).detach()
        assert got.shape == want.shape and rel_err(got, want) <= 1e-5, (h, w)
        shapes.add(tuple(got.shape[2:]))
    assert len(shapes) == 3, "the score map should follow the input size"


# --------------------------------------------------------------------------- names a user can read


def dims_of(value) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_dynamic_axes_are_named_height_and_width_everywhere(tmp_path, exporter):
    rewritten = convify.replace_maxpool(tiny(TinyFCN), torch.randn(1, 3, 24, 24))
    path = convify.export_onnx(rewritten, tmp_path / "fcn.onnx", torch.randn(1, 3, 24, 24), exporter=exporter,
                               dynamic_spatial=True)
    graph = onnx.load(str(path)).graph
    assert dims_of(graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims_of(graph.output[0])[0] == "batch" and dims_of(graph.output[0])[2:] == ["out_height", "out_width"]
    symbols = [d.dim_param for v in (*graph.input, *graph.output, *graph.value_info)
               for d in v.type.tensor_type.shape.dim if d.dim_param]
    assert symbols and not [s for s in symbols if re.search(r"\bs\d+\b", s)]  # no torch.export symbol (s53) left
    x = torch.randn(2, 3, 31, 27)
    (got,) = run_ort(path, x)
    assert rel_err(got, rewritten(x).detach()) <= 1e-5


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_hugging_face_models_keep_their_input_and_output_names(tmp_path, exporter):
    pytest.importorskip("transformers")
    from test_hf import X, hf_resnet

    model = hf_resnet()
    dense = convify.replace_linear_head(model, torch.randn(X), dense=True)
    path = convify.export_onnx(dense, tmp_path / "hf.onnx", torch.randn(X), exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    x = torch.randn(2, 3, 96, 80)  # another size than the export's
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), dense(x).logits) <= 1e-4


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_input_and_output_names_can_be_given(tmp_path, exporter):
    path = convify.export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), exporter=exporter,
                               input_names=["image"], output_names=["scores"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["scores"]
    assert session.get_inputs()[0].shape[0] == "batch"
    with pytest.raises(ExportError, match=r"input_names= gives 2 names \(a, b\) for the model's 1 inputs"):
        convify.export_onnx(tiny(), tmp_path / "bad.onnx", torch.randn(1, 3, 16, 16), input_names=["a", "b"])
    with pytest.raises(ExportError, match="input and output cannot share a name"):
        convify.export_onnx(tiny(), tmp_path / "bad.onnx", torch.randn(1, 3, 16, 16), input_names=["x"],
                            output_names=["x"])
    assert not (tmp_path / "bad.onnx").exists()
