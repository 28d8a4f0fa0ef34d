"""``dense_map`` and ``convify scan`` on dense ONNX files: the tiles run in onnxruntime, the geometry read
from the graph; the map equals the PyTorch dense rewrite's on the same weights; non-dense files are refused."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from test_geometry import Residual, padded_net

import convify
from convify import dense as D
from convify.dense.geometry import NotDenseError, NotTilableError, receptive_field
from convify.dense.onnx_geometry import walk_graph
from convify.errors import UsageError, VerificationError
from convify.onnx import read_model

from cli_factories import tiny_net
from conftest import reinit, rel_err
from onnx_material import tf2onnx_style_classifier
from test_cli import assert_one_line_error, listing, run

TOLERANCE = 1e-5


def small_cnn() -> nn.Module:
    return reinit(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))).eval()


def exported(model: nn.Module, size: int = 16, dynamic_batch: bool = False) -> onnx.ModelProto:
    """``model`` as torch.onnx writes it at a fixed size (a flatten head pins it)."""
    f = io.BytesIO()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(model, torch.randn(1, 3, size, size), f, input_names=["input"], output_names=["logits"],
                      dynamic_axes=axes, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- dense_map


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["batch-1", "dynamic-batch"])
def test_dense_onnx_rewrite_gives_the_torch_dense_map(dynamic_batch, tmp_path: Path) -> None:
    model = small_cnn()
    dense_onnx = convify.replace_linear_head(exported(model, dynamic_batch=dynamic_batch), dense=True)
    dense_torch = convify.replace_linear_head(model, torch.randn(1, 3, 16, 16), dense=True)
    picture = image(90, 75)
    want = D.scan(dense_torch, picture, tile=24, progress=False)
    got = D.scan(dense_onnx, picture, tile=24, progress=False)
    assert got.runner == "onnxruntime (cpu)" and len(got.plan.tiles) > 4
    assert got.plan == want.plan  # the geometry from the graph is the traced model's
    assert got.plan.geometry == receptive_field(dense_torch)
    assert got.batch_size == (1 if not dynamic_batch else got.batch_size)
    assert got.scores.shape == want.scores.shape and rel_err(got.scores, want.scores) <= TOLERANCE
    # the same from a path and an onnx_ir.Model
    path = tmp_path / "dense.onnx"
    onnx.save(dense_onnx, path)
    for source in (path, str(path), read_model(path)):
        assert rel_err(convify.dense_map(source, picture, tile=24, progress=False), want.scores) <= TOLERANCE


def test_tiled_map_of_a_large_image_equals_one_pass(tmp_path: Path) -> None:
    model = small_cnn()
    dense_onnx = convify.replace_linear_head(exported(model, dynamic_batch=True), dense=True)
    dense_torch = convify.replace_linear_head(model, torch.randn(1, 3, 16, 16), dense=True)
    picture = image(333, 270, seed=1)
    tiled = D.scan(dense_onnx, picture, tile=48, batch_size=3, progress=False)
    whole = D.scan(dense_onnx, picture, tile=400, progress=False)
    assert len(tiled.plan.tiles) > 20 and len(whole.plan.tiles) == 1
    with torch.no_grad():
        want = dense_torch(picture[None].float() / 255)
    assert rel_err(tiled.scores, whole.scores) <= TOLERANCE and rel_err(tiled.scores, want) <= TOLERANCE
    session = ort.InferenceSession(dense_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    (one_pass,) = session.run(None, {"input": (picture[None].float() / 255).numpy()})
    assert rel_err(tiled.scores, torch.from_numpy(one_pass)) <= TOLERANCE


@pytest.mark.parametrize("make", [padded_net, Residual], ids=["padded-ceil-dilated", "residual-pad-concat"])
def test_dense_exports_without_a_report_stitch_exactly(make, tmp_path: Path) -> None:
    """A fully convolutional model exported with dynamic height and width (no convify report): ceil_mode,
    dilation, padded average pooling, Pad, Concat and a residual sum, read from the ONNX graph."""
    model = make().eval()
    path = convify.export_onnx(model, tmp_path / "fcn.onnx", torch.randn(1, 3, 32, 32), dynamic_spatial=True)
    picture = torch.randn(3, 101, 77)
    want = D.scan(model, picture, tile=30, progress=False)
    got = D.scan(path, picture, tile=30, progress=False)
    assert got.plan.geometry == want.plan.geometry == receptive_field(model)
    assert got.plan == want.plan and rel_err(got.scores, want.scores) <= TOLERANCE


def test_tf2onnx_channels_last_classifier_with_same_padding() -> None:
    """NHWC input (tiles are fed channels last), MaxPool auto_pad=SAME_UPPER at stride 2 (its padding depends
    on the size: frozen at the one-pass size), explicit asymmetric pads, a Softmax on the map's classes."""
    dense = convify.replace_linear_head(tf2onnx_style_classifier(), dense=True)
    session = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"])
    for height, width in [(64, 48), (61, 77)]:
        picture = image(height, width, seed=2)
        got = D.scan(dense, picture, tile=24, progress=False)
        assert len(got.plan.tiles) > 4
        (want,) = session.run(None, {"input_1": (picture.permute(1, 2, 0)[None].float() / 255).numpy()})
        assert got.scores.shape == want.shape and rel_err(got.scores, torch.from_numpy(want)) <= TOLERANCE


# --------------------------------------------------------------------------- refusals


def test_a_file_that_is_not_dense_is_refused_naming_the_dense_rewrite(tmp_path: Path) -> None:
    original = exported(small_cnn())
    with pytest.raises(NotDenseError, match=r"the ONNX model is not dense: it carries no dense head and its input "
                                            r"'input' has a fixed size \(1x3x16x16\).*replace_linear_head\(model, "
                                            r"dense=True\)"):
        convify.dense_map(original, image(40, 40), progress=False)
    path = tmp_path / "conv.onnx"
    onnx.save(convify.replace_linear_head(original), path)
    with pytest.raises(NotDenseError, match=r"conv.onnx was rewritten without dense=True.*replace_linear_head"):
        convify.dense_map(path, image(40, 40), progress=False)
    assert issubclass(NotDenseError, UsageError) and issubclass(NotDenseError, NotTilableError)


def test_a_graph_that_is_not_fully_convolutional_names_the_node(tmp_path: Path) -> None:
    path = tmp_path / "flat.onnx"
    model = small_cnn()
    torch.onnx.export(model, torch.randn(1, 3, 16, 16), path, input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {2: "height", 3: "width"}})
    with pytest.raises(NotTilableError, match=r"ONNX node '.*Flatten.*' \(Flatten\): it flattens the map"):
        convify.dense_map(path, image(40, 40), progress=False)


def test_torch_only_arguments_and_providers_are_checked() -> None:
    dense = convify.replace_linear_head(exported(small_cnn()), dense=True)
    with pytest.raises(UsageError, match=r"onnx=: an ONNX model runs in onnxruntime"):
        convify.dense_map(dense, image(40, 40), onnx=True, progress=False)
    with pytest.raises(UsageError, match=r"device=: "):
        convify.dense_map(dense, image(40, 40), device="cpu", progress=False)
    with pytest.raises(UsageError, match=r"batch_size=2: the ONNX model takes batches of 1 only"):
        convify.dense_map(dense, image(40, 40), tile=24, batch_size=2, progress=False)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(VerificationError, match="CUDAExecutionProvider"):
            convify.dense_map(dense, image(40, 40), provider="cuda", progress=False)


def test_convify_dense_imports_no_onnx() -> None:
    import subprocess
    import sys

    code = "import sys, convify.dense; assert 'onnx' not in sys.modules and 'onnx_ir' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_walk_gives_the_one_pass_size() -> None:
    model = padded_net()
    path = io.BytesIO()
    torch.onnx.export(model, torch.randn(1, 3, 32, 32), path, input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {2: "h", 3: "w"}})
    ir_model = read_model(onnx.load_from_string(path.getvalue()))
    for size in [(33, 47), (64, 64), (70, 31)]:
        with torch.no_grad():
            assert walk_graph(ir_model, size).output == tuple(model(torch.zeros(1, 3, *size)).shape[2:])


# --------------------------------------------------------------------------- convify scan


def _png(path: Path, height: int, width: int) -> None:
    from PIL import Image

    Image.fromarray(image(height, width, seed=3).permute(1, 2, 0).numpy()).save(path)


def test_scan_of_a_dense_onnx_file_writes_what_the_checkpoint_gives(tmp_path: Path) -> None:
    from PIL import Image

    _png(tmp_path / "big.png", 70, 61)
    model = tiny_net().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    onnx.save(exported(model), tmp_path / "tiny.onnx")
    assert run("rewrite", "tiny.onnx", "--pool", "none", "--dense", "-o", "dense.onnx", cwd=tmp_path).returncode == 0
    proc = run("scan", "dense.onnx", "big.png", "-o", "ort.npy", "--png", "ort.png", "--tile", "24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime (cpu)" in proc.stdout and "converted its head" not in proc.stderr
    torch_args = ["--arch", "cli_factories:tiny_net", "--weights", "w.pt", "--input-shape", "1,3,16,16"]
    proc = run("scan", *torch_args, "big.png", "-o", "torch.npy", "--png", "torch.png", "--tile", "24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got, want = (torch.from_numpy(np.load(tmp_path / name)) for name in ("ort.npy", "torch.npy"))
    assert got.shape == want.shape == (1, 10, 14, 12) and rel_err(got, want) <= TOLERANCE
    a, b = (np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("ort.png", "torch.png"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    # a file that is not dense: one line, exit 2, nothing written
    before = listing(tmp_path)
    proc = run("scan", "tiny.onnx", "big.png", "-o", "s.npy", cwd=tmp_path)
    assert_one_line_error(proc, r"tiny\.onnx is not dense: .* fixed size \(1x3x16x16\).* convify rewrite "
                                r"MODEL\.onnx --dense -o OUT\.onnx", 2)
    proc = run("scan", "dense.onnx", "big.png", "-o", "s.npy", "--device", "cpu", cwd=tmp_path)
    assert_one_line_error(proc, r"dense\.onnx is an ONNX model: --device applies to PyTorch models only", 2)
    assert listing(tmp_path) == before
