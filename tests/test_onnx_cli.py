"""``convify inspect|rewrite|verify MODEL.onnx``: the commands on ONNX files, bad
input (one line, exit 2, no file), and a verifier (Marabou, where installed)
proving the same property on the original and on its exact rewrite."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import convify
from convify.cli import main

from onnx_material import run_onnx, torchvision_export, vnncomp_style_cnn


@pytest.fixture()
def vnn(tmp_path) -> Path:
    path = tmp_path / "vnn.onnx"
    onnx.save(vnncomp_style_cnn(), path)
    return path


def rewrite(src: Path, out: Path, *flags: str) -> int:
    return main(["rewrite", str(src), *flags, "-o", str(out)])


def test_rewrite_writes_the_verifier_form_and_verify_proves_it(tmp_path, vnn, capsys):
    out = tmp_path / "allconv.onnx"
    assert rewrite(vnn, out, "--pool", "exact", "--exact-form", "separable", "--ungrouped", "--head", "none") == 0
    captured = capsys.readouterr()
    assert "exact max tree (separable, ungrouped" in captured.out and f"wrote {out}" in captured.err
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node} == {"Conv", "Relu", "Flatten", "Gemm"}
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["output"]
    assert convify.report(out).exact
    assert main(["verify", str(out), "--against", str(vnn), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verification"]["passed"] and result["verification"]["equivalence"]["exact"]


def test_inspect_and_verify_rewrite_in_memory(vnn, capsys):
    assert main(["inspect", str(vnn), "--pool", "exact", "--head", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["replaced"] == 2 and result["report"]["exact"]
    assert main(["verify", str(vnn), "--pool", "conv", "--head", "none", "--min-agreement", "0.5"]) == 0
    assert "census: MaxPool" in capsys.readouterr().out


def test_rewrite_verify_refuses_to_write_a_failed_rewrite(tmp_path, vnn, capsys):
    out = tmp_path / "conv.onnx"
    assert rewrite(vnn, out, "--pool", "conv", "--head", "none", "--verify", "--min-agreement", "1.01") == 1
    assert not out.exists() and "nothing written" in capsys.readouterr().err


def test_external_data_is_read_and_written_beside_the_output(tmp_path, capsys):
    src = torchvision_export("squeezenet1_1", "dynamo", tmp_path)
    assert Path(str(src) + ".data").exists()
    out = tmp_path / "out" / "exact.onnx"
    out.parent.mkdir()
    assert rewrite(src, out, "--pool", "exact", "--head", "none") == 0
    assert (out.parent / "exact.onnx.data").exists() and not [p for p in out.parent.iterdir() if
                                                              p.name.startswith(".")]
    assert main(["verify", str(out), "--against", str(src)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("how", ["not onnx", "truncated", "checker"])
def test_bad_files_are_one_line_exit_2_and_nothing_written(tmp_path, vnn, capsys, how):
    bad = tmp_path / "bad.onnx"
    if how == "not onnx":
        bad.write_text("hello")
    elif how == "truncated":
        bad.write_bytes(vnn.read_bytes()[:300])
    else:
        model = vnncomp_style_cnn()
        model.graph.node[0].input[1] = "no_such_weight"
        bad.write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    assert rewrite(bad, out, "--pool", "exact", "--head", "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.onnx" in err[0] and not out.exists()
    if how == "checker":
        assert "checker" in err[0]


def test_an_input_without_static_channels_is_exit_2(tmp_path, capsys):
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "C", 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "C", 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    src, out = tmp_path / "dyn.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert rewrite(src, out, "--pool", "exact", "--head", "none") == 2
    err = capsys.readouterr().err
    assert "no static channel count" in err and "make_dynamic_shape_fixed" in err and not out.exists()


def test_nothing_to_rewrite_is_exit_0_and_said(tmp_path, capsys):
    model = vnncomp_style_cnn()
    for node in model.graph.node:
        if node.op_type == "MaxPool":
            node.op_type, node.name = "AveragePool", node.name + "_avg"
    src, out = tmp_path / "avg.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert rewrite(src, out, "--pool", "exact", "--head", "none") == 0
    assert "nothing to rewrite" in capsys.readouterr().err and out.exists()


def test_pytorch_only_flags_and_a_checkpoint_suffix_are_refused(tmp_path, vnn, capsys):
    assert main(["inspect", str(vnn), "--input-shape", "1,1,28,28"]) == 2
    assert "--input-shape applies to PyTorch models only" in capsys.readouterr().err
    assert rewrite(vnn, tmp_path / "out.pt", "--pool", "exact") == 2
    assert "-o writes an ONNX model, not a PyTorch checkpoint" in capsys.readouterr().err
    assert rewrite(vnn, vnn, "--pool", "exact", "--force") == 2
    assert "refusing to write over the input" in capsys.readouterr().err


# --------------------------------------------------------------------------- Marabou


def marabou(path: Path, x: np.ndarray, high: int, low: int, eps: float) -> str:
    """Marabou's answer to: can ``low`` score at least ``high`` within ``eps`` of ``x`` (L-inf)?
    ``"unsat"``: no, proven; ``"sat"``: yes, with a counterexample."""
    from maraboupy import Marabou

    network = Marabou.read_onnx(str(path))
    inputs, outputs = network.inputVars[0].flatten(), network.outputVars[0].flatten()
    for var, value in zip(inputs, x.flatten()):
        network.setLowerBound(var, float(value - eps))
        network.setUpperBound(var, float(value + eps))
    network.addInequality([outputs[high], outputs[low]], [1.0, -1.0], 0.0)  # high - low <= 0
    result, _, _ = network.solve(options=Marabou.createOptions(verbosity=0, timeoutInSeconds=120), verbose=False)
    return result


def test_marabou_proves_the_same_property_on_the_original_and_its_exact_rewrite(tmp_path, vnn):
    pytest.importorskip("maraboupy", reason="Marabou (pip install maraboupy) is an optional test dependency")
    out = tmp_path / "allconv.onnx"
    assert rewrite(vnn, out, "--pool", "exact", "--exact-form", "separable", "--ungrouped", "--head", "none") == 0
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    scores = run_onnx(vnn, {"input": x})[0][0]
    label, other = int(scores.argmax()), int(np.argsort(scores)[-2])
    # local robustness at eps 1e-3 (the runner-up never catches up): proven on both
    assert [marabou(m, x, label, other, 1e-3) for m in (vnn, out)] == ["unsat", "unsat"]
