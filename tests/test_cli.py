"""The ``convify`` command line, driven as a user runs it: ``python -m convify``
in a subprocess, one per behaviour. Inputs are written in-process; outputs are
read back and compared with the same rewrite done in-process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

import convify
from convify import io as ck

from cli_factories import WritesAFile, all_conv_net, tiny_net
from conftest import reinit, rel_err

TESTS = Path(__file__).resolve().parent
TINY = ["--arch", "cli_factories:tiny_net", "--input-shape", "1,3,16,16"]
R18 = ["--arch", "torchvision:resnet18", "--arch-kwargs", "num_classes=10", "--input-shape", "1,3,64,64"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "convify", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("convify: error: "), lines[0]
    assert re.search(match, lines[0]), lines[0]
    assert proc.stdout == ""


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory) -> Path:
    """A resnet18 (10 classes) state_dict as DDP training scripts save it."""
    folder = tmp_path_factory.mktemp("weights")
    model = reinit(torchvision.models.resnet18(num_classes=10), seed=0)
    path = folder / "r18_ddp.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def r18_rewritten_in_process(weights: Path, **options) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=10).eval()
    model.load_state_dict(ck.unwrap(torch.load(weights, weights_only=True)))
    return convify.convify(model, torch.zeros(1, 3, 64, 64), **options)


# --------------------------------------------------------------------------- start-up


def test_help_lists_commands_and_import_pulls_no_torch_or_onnx(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("inspect", "rewrite", "export", "verify", "demo"):
        assert command in proc.stdout
    imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "import convify.cli"],
                             capture_output=True, text=True, cwd=tmp_path).stderr
    modules = {line.split("|")[-1].strip() for line in imports.splitlines() if "|" in line}
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime", "onnxscript", "torchvision", "timm")}
    assert "convify.cli" in modules and not heavy


# --------------------------------------------------------------------------- each MODEL form


def test_rewrite_torchvision_checkpoint_and_load_it_back(tmp_path, r18_weights):
    out = tmp_path / "r18_allconv.pt"
    proc = run("rewrite", *R18, "--weights", str(r18_weights), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"maxpool\s+MaxPool2d", proc.stdout) and "head" in proc.stdout
    # not a terminal: no progress bars, only the note of what was written
    assert proc.stderr.strip().splitlines() == [f"convify: wrote {out}"]
    raw = torch.load(out, weights_only=True)
    assert raw["arch"] == "torchvision:resnet18" and raw["arch_kwargs"] == {"num_classes": 10}
    assert raw["input_shape"] == [1, 3, 64, 64]
    assert [(p["rewrite"], p["options"]) for p in raw["passes"]] == [
        ("maxpool", {"mode": "conv", "init": "avg"}), ("head", {"mode": "conv", "dense": False})]
    back = convify.load(out)
    want = r18_rewritten_in_process(r18_weights)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(back(x), want(x)) <= 1e-5
    assert listing(tmp_path) == ["r18_allconv.pt"]


def test_existing_output_is_refused_without_force(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    proc = run("rewrite", *TINY, "-o", str(out), cwd=tmp_path)
    assert_one_line_error(proc, r"out\.pt exists: pass --force")
    assert out.read_bytes() == b"precious" and listing(tmp_path) == ["out.pt"]


@pytest.mark.parametrize("args, match", [
    (["rewrite", "missing.pt", "-o", "out.onnx"],
     r"-o out\.onnx: -o writes a PyTorch checkpoint, not an ONNX model; name it out\.pt \(--onnx out\.onnx exports"),
    (["rewrite", "missing.pt", "-o", "out.pt", "--onnx", "out.pth"],
     r"--onnx out\.pth: --onnx writes an ONNX model, not a PyTorch checkpoint; name it out\.onnx"),
    (["export", "missing.pt", "-o", "x.pt"],
     r"-o x\.pt: -o writes an ONNX model, not a PyTorch checkpoint; name it x\.onnx \(.*`convify rewrite -o`"),
    (["export", "missing.pt", "-o", "x.safetensors"], r"-o x\.safetensors: .* not safetensors weights; name it x\.onnx"),
    (["scan", "missing.pt", "image.png", "-o", "map.png"],
     r"-o map\.png: -o writes a NumPy array, not a PNG image; name it map\.npy \(--png map\.png draws the heat map"),
    (["scan", "missing.pt", "image.png", "-o", "map.npy", "--png", "heat.npy"], r"--png heat\.npy: .* name it heat\.png"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_an_output_named_for_another_format_is_refused_before_any_work(tmp_path, monkeypatch, capsys, args, match):
    """MODEL does not even exist: the name is refused before anything is read, and nothing is written."""
    from convify.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(args)
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), match)
    assert listing(tmp_path) == []


def test_export_of_a_plain_model_says_nothing_was_rewritten(tmp_path):
    """export writes the model as it is (its --help says so); for a model no rewrite touched, the first line says
    that nothing was rewritten, what is left, and how to rewrite first. A checkpoint exports without that note."""
    from convify.export.census import op_census

    proc = run("export", *TINY, "-o", "plain.onnx", "--exporter", "legacy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"convify: exported cli_factories:tiny_net as it is: nothing was rewritten \(plain\.onnx "
                        r"still has 2 MaxPool nodes, 2 Gemm nodes\); to export the all-convolutional model, run "
                        r"`convify rewrite` with the same model arguments and --onnx plain\.onnx .*", lines[0]), lines
    assert lines[1:] == ["convify: wrote plain.onnx", "convify: plain.onnx holds the weights cli_factories:tiny_net "
                         "builds: no --weights was given (random, unless the factory loads trained ones)"]
    census = op_census(tmp_path / "plain.onnx")
    assert census["MaxPool"] == 2 and census["Gemm"] == 2
    assert run("rewrite", *TINY, "-o", "tiny.pt", cwd=tmp_path).returncode == 0
    proc = run("export", "tiny.pt", "--trust-code", "-o", "allconv.onnx", "--exporter", "legacy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["convify: wrote allconv.onnx"]
    assert "MaxPool" not in op_census(tmp_path / "allconv.onnx")
    assert "nothing is rewritten" in " ".join(run("export", "--help", cwd=tmp_path).stdout.split())


def test_a_checkpoint_of_an_untrained_architecture_says_so(tmp_path, monkeypatch, capsys):
    from convify.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["rewrite", *R18, "-o", "r18.pt"]) == 0
    err = capsys.readouterr().err
    assert ("convify: r18.pt holds random weights: --arch torchvision:resnet18 was built without --weights "
            "(give the trained ones with --weights FILE)") in err.splitlines()


def test_inspect_safetensors_weights_as_json_writes_nothing(tmp_path):
    from safetensors.torch import save_file

    save_file(reinit(torchvision.models.resnet18(num_classes=10)).state_dict(), tmp_path / "r18.safetensors")
    proc = run("inspect", *R18, "--weights", "r18.safetensors", "--json", "--head", "gap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["input_shape"] == [1, 3, 64, 64] and doc["rewrite"]["head"] == "gap"
    replaced = {p["rewrite"]: [r["name"] for r in p["replaced"]] for p in doc["report"]["passes"]}
    assert replaced["maxpool"] == ["maxpool"] and replaced["head"]
    assert listing(tmp_path) == ["r18.safetensors"]


def test_import_path_model_checkpoint_needs_trust_code_to_load(tmp_path):
    proc = run("rewrite", *TINY, "-o", "tiny.pt", "--onnx", "tiny.onnx", "--exporter", "legacy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path) == ["tiny.onnx", "tiny.pt"]
    refused = run("inspect", "tiny.pt", cwd=tmp_path)
    assert_one_line_error(refused, r"calling cli_factories:tiny_net, code chosen by whoever wrote the file.*"
                                   r"--trust-code")
    proc = run("export", "tiny.pt", "--trust-code", "-o", "again.onnx", "--exporter", "legacy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import onnxruntime as ort

    model = convify.load(tmp_path / "tiny.pt", trust_code=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    for name in ("tiny.onnx", "again.onnx"):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert rel_err(torch.from_numpy(got), want) <= 1e-4


def test_pickled_module_needs_trust_pickle_and_gives_a_pickled_module(tmp_path):
    model = reinit(tiny_net(), seed=1).eval()
    torch.save(model, tmp_path / "whole.pt")
    refused = run("rewrite", "whole.pt", "--input-shape", "1,3,16,16", "-o", "out.pt", cwd=tmp_path)
    assert_one_line_error(refused, r"pickled Python objects.*runs code from the file.*--trust-pickle")
    proc = run("rewrite", "whole.pt", "--trust-pickle", "--input-shape", "1,3,16,16", "-o", "out.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "needs the same trust" in proc.stderr
    assert "it names no convify class or function: torch and the model's own code load it" in proc.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    want = convify.convify(model, torch.zeros(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(out(x), want(x)) <= 1e-6
    assert convify.report(out) == convify.report(want)
    from test_portable import load_without_convify

    loaded = load_without_convify(tmp_path / "out.pt", "2,3,16,16", "1,3,32,32")  # the README's promise
    assert loaded["results"][0] == [2, 10] and loaded["report"] == "dict"
    assert loaded["results"][1].startswith("AssertionError: 8: this classifier head was rewritten for a 4x4")


def test_export_and_rewrite_name_the_onnx_inputs_and_outputs(tmp_path):
    import onnx

    proc = run("export", *TINY, "--input-names", "image", "--output-names", "scores", "-o", "m.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["scores"]
    proc = run("rewrite", *TINY, "--output-names", "scores", "-o", "r.pt", "--onnx", "r.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    graph = onnx.load(str(tmp_path / "r.onnx")).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["scores"]
    bad = run("export", *TINY, "--input-names", "a,b", "-o", "bad.onnx", cwd=tmp_path)
    assert_one_line_error(bad, r"--input-names gives 2 names \(a, b\) for the model's 1 inputs", code=1)
    assert not (tmp_path / "bad.onnx").exists()


def test_a_pickled_output_that_needs_convify_says_so(tmp_path):
    pytest.importorskip("timm")
    from timm.layers.pool2d_same import MaxPool2dSame

    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), MaxPool2dSame(3, 2)).eval(), tmp_path / "same.pt")
    proc = run("rewrite", "same.pt", "--trust-pickle", "--input-shape", "1,3,15,15", "-o", "out.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"it names convify \(convify\.fx\.rewrites\.maxpool\.same\.PadSame \(at 1_pad\)\), which no "
                     r"plain torch module replaces: loading it needs convify installed", proc.stderr), proc.stderr


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": WritesAFile(str(marker))}, tmp_path / "evil.pt")
    proc = run("rewrite", "evil.pt", "-o", "out.pt", cwd=tmp_path)
    assert_one_line_error(proc, r"evil\.pt holds pickled Python objects \(.*open\).*--trust-pickle")
    assert not marker.exists() and listing(tmp_path) == ["evil.pt"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_refused_with_the_reason(tmp_path):
    torch.jit.save(torch.jit.script(tiny_net()), tmp_path / "scripted.pt")
    proc = run("inspect", "scripted.pt", "--trust-pickle", cwd=tmp_path)
    assert_one_line_error(proc, r"TorchScript archive: torch\.fx cannot trace")


@pytest.mark.skipif(sys.modules.get("timm") is None and __import__("importlib").util.find_spec("timm") is None,
                    reason="timm not installed")
def test_timm_architecture(tmp_path):
    proc = run("inspect", "--arch", "timm:resnet10t", "--input-shape", "1,3,64,64", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["arch"] == "timm:resnet10t" and doc["replaced"] >= 1


def test_nothing_to_rewrite_is_not_an_error(tmp_path):
    proc = run("rewrite", "--arch", "cli_factories:all_conv_net", "--input-shape", "1,3,16,16", "-o", "same.pt",
               "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("convify: nothing to rewrite in cli_factories:all_conv_net: ") and lines[0].endswith(
        "same.pt holds the model unchanged"), lines  # the first thing said, before "wrote"
    assert "0 sites skipped" in lines[0] and lines[1] == "convify: wrote same.pt"
    assert ("convify: same.pt rebuilds its model by calling cli_factories:all_conv_net: every use of it needs "
            "--trust-code (convify.load(..., trust_code=True)) and that module importable") in lines
    doc = json.loads(proc.stdout)
    assert doc["nothing_to_rewrite"] is True and doc["written"] == ["same.pt"]
    back = convify.load(tmp_path / "same.pt", trust_code=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(back(x), all_conv_net()(x)) <= 1e-6


# --------------------------------------------------------------------------- bad input


def _write_bad_inputs(folder: Path) -> None:
    (folder / "empty.pt").write_bytes(b"")
    torch.save(tiny_net().state_dict(), folder / "good.pt")
    (folder / "trunc.pt").write_bytes((folder / "good.pt").read_bytes()[:700])
    (folder / "corrupt.pt").write_bytes(b"\x80\x02this is not a pickle at all" * 10)
    (folder / "a_folder").mkdir()
    (folder / "a_file").write_bytes(b"x")
    (folder / "notes.pt").write_text("trained for 7 epochs, accuracy 0.91\n")
    (folder / "notes.onnx").write_text("exported on Monday\n")
    _onnx_model(folder / "model.onnx")


def _onnx_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), path)


# The bad inputs the issue names, each in its own process as a user meets them.
BAD_INPUTS = {
    "missing file": (["inspect", "nope.pt"], r"nope\.pt: no such model file"),
    "empty file": (["inspect", "empty.pt"], r"empty\.pt is empty"),
    "truncated file": (["inspect", "--arch", "cli_factories:tiny_net", "trunc.pt"],
                       r"trunc\.pt .*truncated or corrupt"),
    "corrupt file": (["inspect", "corrupt.pt"], r"corrupt\.pt .*truncated or corrupt"),
    "a folder": (["inspect", "a_folder"], r"a_folder is a folder"),
    "unknown architecture": (["inspect", "--arch", "torchvision:resnet81"], r"unknown torchvision .*resnet18"),
    "weights do not fit": (["inspect", "--arch", "cli_factories:tiny_net", "--arch-kwargs", "num_classes=3",
                            "--weights", "good.pt"],
                           r"do not fit cli_factories:tiny_net: 2 of another shape \(10\.weight \[10, 16\] in file"),
    "malformed input shape": (["inspect", *TINY[:2], "--input-shape", "1,3,x16"], r"--input-shape: malformed"),
    "output folder missing": (["rewrite", *TINY, "-o", "no/such/out.pt"], r"folder no/such does not exist"),
    # an ONNX file as MODEL is rewritten by the ONNX frontend (tests/test_onnx_cli.py); one that is not ONNX:
    "a text file named .onnx": (["inspect", "notes.onnx"],
                                r"notes\.onnx is not an ONNX model, or is truncated \(WireError: wire type"),
    "a text file named .pt": (["inspect", "notes.pt"], r"notes\.pt is a text file, not a PyTorch model file"),
    # runs as one unbatched 1x3x224 image, so the forward check alone lets it through
    "input shape of another rank": (["rewrite", "--arch", "cli_factories:all_conv_net", "--arch-kwargs", "channels=1",
                                     "--input-shape", "1,3,224", "-o", "gray.pt"],
                                    r"--input-shape 1,3,224 has 3 dimensions, but cli_factories:all_conv_net starts "
                                    r"with a Conv2d: it takes 4 \(N,C and 2 spatial\), e\.g\. --input-shape "
                                    r"1,1,224,224"),
}

# More of the same, run in-process through convify.cli.main to keep the suite fast.
MORE_BAD_INPUTS = {
    "state_dict without arch": (["inspect", "good.pt"], r"state_dict .* but no architecture.*--arch"),
    "input shape the model refuses": (["inspect", *TINY[:2], "--input-shape", "1,1,16,16"],
                                      r"does not run on an input of shape 1x1x16x16.*--input-shape"),
    "bad arch kwargs": (["inspect", *TINY, "--arch-kwargs", "num_classes=ten"], r"Python literal"),
    "unknown builder argument": (["inspect", *TINY, "--arch-kwargs", "classes=3"],
                                 r"building cli_factories:tiny_net\(classes=3\) failed: TypeError"),
    "output folder is a file": (["rewrite", *TINY, "-o", "a_file/out.pt"], r"a_file is not a folder"),
    "output over the input": (["rewrite", *TINY, "--weights", "good.pt", "-o", "./good.pt", "--force"],
                              r"refusing to write over the input good\.pt"),
    "onnx output over the checkpoint": (["rewrite", *TINY, "-o", "x.model", "--onnx", "x.model"],
                                        r"refusing to write over the input x\.model"),
    "weights twice": (["inspect", *TINY, "good.pt", "--weights", "good.pt"], r"either as MODEL or with --weights"),
    "weights without arch": (["inspect", "--weights", "good.pt"], r"--weights needs --arch"),
    "no model": (["inspect"], r"no model given"),
    "an ONNX file as weights": (["inspect", *TINY, "--weights", "model.onnx"],
                                r"model\.onnx is an ONNX model, not a PyTorch weights file"),
}


def _snapshot(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    _write_bad_inputs(tmp_path)
    before = _snapshot(tmp_path)
    args, match = BAD_INPUTS[case]
    proc = run(*args, cwd=tmp_path)
    assert_one_line_error(proc, match)
    assert "Traceback" not in proc.stderr
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", list(MORE_BAD_INPUTS))
def test_more_bad_input_in_process(tmp_path, monkeypatch, capsys, case):
    from convify.cli import main

    _write_bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    args, match = MORE_BAD_INPUTS[case]
    code = main(args)
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), match)
    assert _snapshot(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from convify.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--debug", "--arch", "torchvision:resnet81"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("convify: error: unknown torchvision architecture")


def _corrupt_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A convify checkpoint of tiny_net, and a copy with 50 bytes of its
    largest tensor's data changed (torch.load reads the copy without complaint)."""
    good = convify.save(convify.convify(tiny_net().eval(), torch.zeros(1, 3, 16, 16)), folder / "good_ck.pt",
                        arch="cli_factories:tiny_net")
    data = bytearray(good.read_bytes())
    weight = torch.load(good, weights_only=True)["state_dict"]["8.weight"]  # 8 KiB of float32
    start = bytes(data).index(weight.numpy().tobytes()[:64])
    data[start + 1000:start + 1050] = bytes(50)
    bad = folder / "bad_ck.pt"
    bad.write_bytes(bytes(data))
    changed = torch.load(bad, weights_only=True)["state_dict"]["8.weight"]  # read without complaint
    assert not torch.equal(changed, weight)
    return good, bad


def test_corrupt_checkpoint_is_one_line_exit_2(tmp_path):
    _corrupt_checkpoint(tmp_path)
    before = _snapshot(tmp_path)
    proc = run("inspect", "bad_ck.pt", "--trust-code", cwd=tmp_path)
    assert_one_line_error(proc, r"bad_ck\.pt: the weights do not match the digest in its recipe \(the file is corrupt")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("args", [
    ["rewrite", "bad_ck.pt", "-o", "out.pt"],
    ["verify", "bad_ck.pt"],
    ["export", "bad_ck.pt", "-o", "out.onnx"],
    ["distill", "good_ck.pt", "--teacher", "bad_ck.pt", "--data", "images", "-o", "out.pt"],
], ids=lambda args: args[0])
def test_every_command_refuses_a_corrupt_checkpoint(tmp_path, monkeypatch, capsys, args):
    from convify.cli import main

    _corrupt_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    code = main([*args, "--trust-code"])
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(args, code, captured.out, captured.err),
                          r"bad_ck\.pt: the weights do not match the digest")
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- verification


def test_failed_verification_exits_1_and_writes_nothing(tmp_path):
    # fresh (kaiming) pooling weights cannot keep every top-1 decision
    proc = run("rewrite", *TINY, "--init", "kaiming", "--verify", "--min-agreement", "1.0", "--exporter", "legacy",
               "-o", "out.pt", "--onnx", "out.onnx", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stdout and "nothing written" in proc.stderr
    assert listing(tmp_path) == []


def test_verify_json_passes_an_exact_head_rewrite(tmp_path):
    proc = run("verify", *TINY, "--pool", "none", "--json", "--exporter", "legacy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verification"]["passed"] is True
    assert [p["rewrite"] for p in doc["report"]["passes"]][-1] == "head"
    assert listing(tmp_path) == []


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A folder: trained-looking tiny_net weights (w.pt), rewritten to both.pt (pooling and head) and head.pt
    (head only). Tests run in it and write nothing there."""
    folder = tmp_path_factory.mktemp("checkpoints")
    weights = folder / "w.pt"
    torch.save(reinit(tiny_net(), seed=1).state_dict(), weights)
    for name, extra in (("both.pt", []), ("head.pt", ["--pool", "none"])):
        proc = run("rewrite", *TINY, str(weights), *extra, "-o", name, cwd=folder)
        assert proc.returncode == 0, proc.stderr
    return folder


def _agreement_in_process(folder: Path, checkpoint: str, images: Path, count: int) -> float:
    """Top-1 agreement of the checkpoint with tiny_net and w.pt on the first ``count`` images, read in-process."""
    from convify.core.metrics import top1_agreement
    from convify.recovery.distillation import image_folder

    original = tiny_net().eval()
    original.load_state_dict(torch.load(folder / "w.pt", weights_only=True))
    data = image_folder(images, (1, 3, 16, 16))
    x = torch.stack([data[i] for i in range(count)])
    with torch.no_grad():
        return top1_agreement(convify.load(folder / checkpoint, trust_code=True)(x), original(x))


def test_verify_a_checkpoint_against_its_original(tmp_path, tiny_checkpoints):
    """A checkpoint is compared with its recipe's architecture holding the original weights, not with itself:
    the pooling rewrite is not exact (and misses top-1 decisions on real images), the head-only rewrite is."""
    folder, before = tiny_checkpoints, listing(tiny_checkpoints)
    weights = folder / "w.pt"
    images = write_images(tmp_path / "images", 40, seed=2)
    proc = run("verify", "both.pt", "--trust-code", "--against", str(weights), "--json", "--exporter", "legacy",
               cwd=folder)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    eq = doc["verification"]["equivalence"]
    assert doc["model"] == "both.pt" and doc["against"] == f"cli_factories:tiny_net + {weights}"
    assert eq["exact"] is False and eq["max_abs"] > 1e-3 and eq["passed"] is None
    assert doc["verification"]["census"]["original"]["MaxPool"] == 2  # the original's graph, not the rewrite's
    assert doc["verification"]["census"]["rewritten"].get("MaxPool", 0) == 0
    # judged on 40 real images, the pooling rewrite keeps fewer than all top-1 decisions: exit 1
    proc = run("verify", "both.pt", "--trust-code", "--against", str(weights), "--inputs", str(images),
               "--min-agreement", "0.999", "--json", "--exporter", "legacy", cwd=folder)
    assert proc.returncode == 1, proc.stderr
    verification = json.loads(proc.stdout)["verification"]
    agreement = verification["equivalence"]["top1_agreement"]
    assert agreement == pytest.approx(_agreement_in_process(folder, "both.pt", images, 40)) and agreement < 1
    assert verification["inputs"] == {"source": f"40 images from {images}", "count": 40}
    # the head-only rewrite is exact against the original (--weights says the same as --against)
    proc = run("verify", "head.pt", "--trust-code", "--weights", str(weights), "--exporter", "legacy", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "convify verify: PASSED" in proc.stdout and "nothing to rewrite" not in proc.stderr
    assert re.search(r"equivalence \(exact rewrite\) +max abs", proc.stdout)
    assert listing(folder) == before  # wrote nothing


@pytest.mark.parametrize("args, match", [
    (["both.pt"], r"both\.pt is already rewritten: verifying it needs the original .*cli_factories:tiny_net.* "
                  r"pass --against FILE"),
    (["both.pt", "--against", "w.pt", "--pool", "depthwise"], r"verified as it was written: leave out --pool"),
    (["both.pt", "--against", "both.pt"], r"both\.pt is a rewritten model too, not the original"),
    (["both.pt", "--against", "w.pt", "--weights", "w.pt"], r"--weights and --against both name the original"),
    (["--against", "w.pt", *TINY], r"--against w\.pt: cli_factories:tiny_net is not rewritten yet"),
])
def test_verify_of_a_checkpoint_without_its_original_is_refused(tiny_checkpoints, args, match):
    proc = run("verify", *args, "--trust-code", cwd=tiny_checkpoints)
    assert_one_line_error(proc, match)


def test_verify_on_images_and_on_a_count_of_inputs(tmp_path):
    """--inputs DIR: the equivalence is measured on the folder's images (at most --inputs-count of them), and the
    table and JSON say so; --inputs-count alone: that many seeded random inputs instead of 8. rewrite --verify
    takes the same flags."""
    write_images(tmp_path / "images", 40, seed=3)
    proc = run("verify", *TINY, "--inputs", "images", "--inputs-count", "30", "--json", "--exporter", "legacy",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    verification = json.loads(proc.stdout)["verification"]
    assert verification["inputs"] == {"source": "30 images from images", "count": 30}
    assert verification["input_shapes"] == [[30, 3, 16, 16]]
    proc = run("verify", *TINY, "--inputs-count", "100", "--exporter", "legacy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "inputs 100x3x16x16, seeded random]" in proc.stdout
    proc = run("rewrite", *TINY, "--verify", "--inputs", "images", "--exporter", "legacy", "-o", "out.pt",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "inputs 40x3x16x16, 40 images from images]" in proc.stdout


@pytest.mark.parametrize("args, match", [
    (["--inputs", "nowhere"], r"--inputs nowhere: no such folder"),
    (["--inputs", "empty"], r"--inputs empty holds no images"),
    (["--inputs-count", "0"], r"--inputs-count 0: give a positive number"),
])
def test_verify_inputs_errors_are_one_line(tmp_path, args, match):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("verify", *TINY, *args, cwd=tmp_path), match)


def test_readme_dense_rewrite_then_dynamic_spatial_export_runs_at_two_sizes(tmp_path):
    """The README's command (rewrite --dense --onnx --verify): a dense model's ONNX file takes any height and
    width without being asked; export --dynamic-spatial does the same, --no-dynamic-spatial pins the size."""
    import onnxruntime as ort

    proc = run("rewrite", *TINY, "--dense", "-o", "dense.pt", "--onnx", "dense.onnx", "--verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "dense=True" in proc.stdout and "convify verify: PASSED" in proc.stdout
    proc = run("export", "dense.pt", "--trust-code", "--dynamic-spatial", "-o", "dynamic.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run("export", "dense.pt", "--trust-code", "--no-dynamic-spatial", "-o", "fixed.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path) == ["dense.onnx", "dense.pt", "dynamic.onnx", "fixed.onnx"]
    model = convify.load(tmp_path / "dense.pt", trust_code=True)
    assert convify.report(model).last.options["dense"] is True
    rewritten, dynamic, fixed = (ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                                 for name in ("dense.onnx", "dynamic.onnx", "fixed.onnx"))
    g = torch.Generator().manual_seed(0)
    for (h, w), scores in [((16, 16), (1, 1)), ((32, 24), (5, 3))]:  # 4x4 head kernel on an 8x6 map: 5x3
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            want = model(x)
        assert want.shape == (2, 10, *scores)
        sessions = (rewritten, dynamic, fixed) if (h, w) == (16, 16) else (rewritten, dynamic)
        for session in sessions:
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            assert got.shape == want.shape and rel_err(got, want) <= 1e-4
    with pytest.raises(Exception, match="Got invalid dimensions for input"):
        fixed.run(None, {"input": torch.randn(1, 3, 32, 24).numpy()})


# --------------------------------------------------------------------------- scan


def _png(path: Path, height: int, width: int, seed: int = 0) -> torch.Tensor:
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    Image.fromarray(pixels.numpy()).save(path)
    return pixels.permute(2, 0, 1)


def _tiny_dense() -> torch.nn.Module:
    return convify.replace_linear_head(tiny_net().eval(), torch.zeros(1, 3, 16, 16), dense=True)


def test_scan_converts_the_head_and_writes_the_map_and_a_heat_map(tmp_path):
    import numpy as np
    from PIL import Image

    pixels = _png(tmp_path / "big.png", 70, 61)
    proc = run("scan", *TINY, "big.png", "-o", "scores.npy", "--png", "heat.png", "--tile", "24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "is not dense: converted its head" in proc.stderr
    assert re.search(r"image 3x70x61 -> map 1x10x14x12 .* stride 4x4, receptive field 2\dx2\d", proc.stdout)
    assert listing(tmp_path) == ["big.png", "heat.png", "scores.npy"]
    scores = torch.from_numpy(np.load(tmp_path / "scores.npy"))
    with torch.no_grad():
        want = _tiny_dense()(pixels[None].float() / 255)
    assert scores.shape == want.shape and rel_err(scores, want) <= 1e-5
    assert Image.open(tmp_path / "heat.png").size == (61, 70)
    # the same through onnxruntime, as JSON; a per-class heat map
    proc = run("scan", *TINY, "big.png", "-o", "ort.npy", "--onnx", "--json", "--png", "class3.png", "--class", "3",
               "--tile", "24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["runner"] == "onnxruntime (cpu)" and summary["tiles"] > 1 and summary["map"] == [1, 10, 14, 12]
    assert rel_err(torch.from_numpy(np.load(tmp_path / "ort.npy")), want) <= 1e-4


def test_scan_reads_a_dense_checkpoint_as_it_is(tmp_path):
    import numpy as np

    pixels = _png(tmp_path / "image.png", 40, 52)
    assert run("rewrite", *TINY, "--dense", "-o", "dense.pt", cwd=tmp_path).returncode == 0
    proc = run("scan", "dense.pt", "--trust-code", "image.png", "-o", "scores.npy", cwd=tmp_path)  # option between
    assert proc.returncode == 0, proc.stderr
    assert "converted its head" not in proc.stderr
    model = convify.load(tmp_path / "dense.pt", trust_code=True)
    with torch.no_grad():
        want = model(pixels[None].float() / 255)
    assert rel_err(torch.from_numpy(np.load(tmp_path / "scores.npy")), want) <= 1e-5


@pytest.mark.parametrize("mode, channels, said", [
    ("L", 3, r"image\.png is grayscale: its one channel is repeated as R, G and B \(cli_factories:tiny_net takes 3 "
             r"channels\)"),
    ("RGBA", 3, r"image\.png has transparency: its alpha channel is dropped \(cli_factories:tiny_net takes 3"),
    ("RGB", 1, r"image\.png is in colour: converted to gray \(0\.299 R \+ 0\.587 G \+ 0\.114 B\) "
               r"\(cli_factories:tiny_net takes 1 channel\)"),
    ("LA", 1, r"image\.png has transparency: its alpha channel is dropped \(cli_factories:tiny_net takes 1 channel"),
    ("RGB", 3, None),
    ("L", 1, None),
])
def test_scan_says_how_it_read_the_image(tmp_path, monkeypatch, capsys, mode, channels, said):
    """A note each time the image had to change to fit the model's channels; none when it fits. A 20x20 image is
    one tile (not "1 tiles")."""
    from PIL import Image

    from convify.cli import main

    monkeypatch.chdir(tmp_path)
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = torch.randint(0, 256, (20, 20, bands), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.squeeze(-1).numpy() if bands == 1 else pixels.numpy(), mode).save("image.png")
    code = main(["scan", "--arch", "cli_factories:tiny_net", "--arch-kwargs", f"channels={channels}",
                 "--input-shape", f"1,{channels},16,16", "image.png", "-o", "s.npy"])
    out, err = capsys.readouterr()
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("convify: image.png ")]
    if said is None:
        assert notes == [], err
    else:
        assert len(notes) == 1 and re.fullmatch("convify: " + said + ".*", notes[0]), err
    assert " 1 tile of " in out, out


def test_scan_makes_a_checkpoint_without_dense_dense_keeping_its_weights(tmp_path, r18_weights):
    """A recipe without --dense (resnet18: an average pooling in front of its converted head) is rebuilt with its
    head dense and the checkpoint's weights: the map of convify(..., dense=True) on the same weights."""
    import numpy as np

    pixels = _png(tmp_path / "image.png", 96, 80)
    assert run("rewrite", *R18, str(r18_weights), "-o", "allconv.pt", cwd=tmp_path).returncode == 0
    proc = run("scan", "allconv.pt", "image.png", "-o", "scores.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "allconv.pt is not dense: converted its head dense" in proc.stderr
    assert "replace_linear_head" not in proc.stderr + proc.stdout
    with torch.no_grad():
        want = r18_rewritten_in_process(r18_weights, dense=True)(pixels[None].float() / 255)
    scores = torch.from_numpy(np.load(tmp_path / "scores.npy"))
    assert scores.shape == want.shape == (1, 10, 3, 3) and rel_err(scores, want) <= 1e-5


@pytest.mark.parametrize("argv", [
    ["scan", "m.pt", "--tile", "64", "big.png", "-o", "s.npy"],
    ["scan", "--tile", "64", "m.pt", "big.png", "-o", "s.npy"],
    ["scan", "-o", "s.npy", "m.pt", "big.png", "--tile", "64"],
])
def test_options_may_sit_anywhere_between_positionals(argv):
    from convify.cli import build_parser

    args = build_parser(argv=argv).parse_args(argv)
    assert (args.model, args.image, args.tile, args.output) == ("m.pt", "big.png", 64, "s.npy")
    args = build_parser(argv=argv).parse_args(["scan", "--arch", "timm:vgg11", "--tile", "64", "big.png", "-o", "s"])
    assert (args.model, args.image, args.arch) == (None, "big.png", "timm:vgg11")


@pytest.mark.parametrize("case, args, match, code", [
    ("existing output", ["image.png", "-o", "taken.npy"], r"taken.npy exists: pass --force", 2),
    ("missing image", ["nothing.png", "-o", "s.npy"], r"nothing.png: no such image file", 2),
    ("not an image", ["notes.png", "-o", "s.npy"], r"notes.png: cannot read it as an image", 2),
    ("no such class", ["image.png", "-o", "s.npy", "--png", "h.png", "--class", "10"], r"--class 10: the map has 10", 2),
    ("tile too small", ["image.png", "-o", "s.npy", "--tile", "0"], r"tile must be a positive number", 2),
])
def test_scan_errors_are_one_line_and_write_nothing(tmp_path, case, args, match, code):
    _png(tmp_path / "image.png", 30, 30)
    (tmp_path / "taken.npy").write_bytes(b"old")
    (tmp_path / "notes.png").write_text("not a picture")
    before = listing(tmp_path)
    proc = run("scan", *TINY, *args, cwd=tmp_path)
    assert_one_line_error(proc, match, code)
    assert listing(tmp_path) == before and (tmp_path / "taken.npy").read_bytes() == b"old"


def test_scan_of_a_model_that_cannot_be_dense_names_the_node(tmp_path):
    _png(tmp_path / "image.png", 30, 30)
    proc = run("scan", "--arch", "cli_factories:all_conv_net", "--input-shape", "1,3,16,16", "image.png", "-o",
               "s.npy", cwd=tmp_path)
    assert_one_line_error(proc, r"node '_3' .*AdaptiveAvgPool2d.*not dense.* with convify rewrite --dense, or", 1)
    assert listing(tmp_path) == ["image.png"]


def read_terminal(pid: int, fd: int, seconds: float) -> tuple[bytes, int | None]:
    """What the child ``pid`` writes to the terminal ``fd`` and its exit code;
    None when it runs past ``seconds`` (it is then killed), so that a child
    waiting on its terminal fails the test instead of hanging it."""
    import select
    import signal

    deadline = time.monotonic() + seconds
    out = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return out, None
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return out, os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.name != "posix", reason="needs a pseudo-terminal")
def test_progress_shows_on_a_terminal(tmp_path):
    """The other half of 'quiet when not a terminal' (checked in the tests above)."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of 120 columns on stdout and stderr
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(tmp_path)
        os.execvpe(sys.executable, [sys.executable, "-m", "convify", "inspect", *TINY, "--json"], env)
    out, code = read_terminal(pid, fd, seconds=120)
    assert code is not None, "convify inspect on a terminal ran past 120 s:\n" + out.decode(errors="replace")
    assert code == 0, out.decode(errors="replace")
    assert b"convify: rewriting in memory [1/2]" in out


@pytest.mark.skipif(os.name != "posix", reason="needs a pseudo-terminal")
@pytest.mark.parametrize("args, step", [
    (["export", *TINY, "-o", "t.onnx"], b"exporting to ONNX"),
    (["verify", *TINY, "--pool", "none"], b"verifying through onnxruntime"),
], ids=["export", "verify"])
def test_progress_goes_on_through_an_onnx_export(tmp_path, args, step):
    """The exporter silences descriptor 2 while it runs (seconds to minutes): the bar writes to its own copy of it,
    and a spinner and the elapsed time keep moving through the long step."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(tmp_path)
        os.execvpe(sys.executable, [sys.executable, "-m", "convify", *args], env)
    out, code = read_terminal(pid, fd, seconds=300)
    assert code == 0, out.decode(errors="replace")
    frames = set(re.findall(rb"convify: " + step + rb" ([|/\\-]) \[\d/\d\] (\d\d:\d\d)", out))
    assert len(frames) >= 3, out.decode(errors="replace")


# --------------------------------------------------------------------------- init=fit from a folder of images


def write_images(folder: Path, count: int, seed: int) -> Path:
    """``count`` random 20x20 RGB PNGs in ``folder`` (created)."""
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def test_rewrite_with_fit_init_on_calibration_images_and_load_back(tmp_path):
    images = write_images(tmp_path / "calib", 12, seed=0)
    out = tmp_path / "fit.pt"
    proc = run("rewrite", *TINY, "--init", "fit", "--calibration", str(images), "--head", "none", "-o", str(out),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "init=fit, reconstruction error" in proc.stdout
    env_path = str(TESTS)  # the recipe names cli_factories:tiny_net, an import path
    sys.path.insert(0, env_path)
    try:
        fitted = convify.load(out, trust_code=True)
        avg = convify.replace_maxpool(tiny_net().eval(), torch.zeros(1, 3, 16, 16))
    finally:
        sys.path.remove(env_path)
    conv_fit, conv_avg = fitted.get_submodule("3"), avg.get_submodule("3")
    assert not torch.allclose(conv_fit.weight, conv_avg.weight)  # the fitted weights survived the round trip
    assert convify.report(fitted).last.options["init"] == "fit"


def test_rewrite_with_reconstruct_writes_a_checkpoint_that_loads_back(tmp_path):
    images = write_images(tmp_path / "calib", 16, seed=1)
    g = torch.Generator().manual_seed(2)
    fit_only, rebuilt = tmp_path / "fit.pt", tmp_path / "rec.pt"
    common = ["rewrite", *TINY, "--init", "fit", "--calibration", str(images), "--head", "none"]
    assert run(*common, "-o", str(fit_only), cwd=tmp_path).returncode == 0
    proc = run(*common, "--reconstruct", "--reconstruct-steps", "20", "--reconstruct-lr", "0.003", "-o", str(rebuilt),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "reconstructed: error" in proc.stdout and "20 Adam steps at lr 0.003" in proc.stdout
    sys.path.insert(0, str(TESTS))
    try:
        fitted, reconstructed = convify.load(fit_only, trust_code=True), convify.load(rebuilt, trust_code=True)
    finally:
        sys.path.remove(str(TESTS))
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        assert not torch.allclose(reconstructed(x), fitted(x))  # the reconstructed weights were written
    assert convify.report(reconstructed).last.options["init"] == "fit"


def test_rewrite_with_synthetic_calibration_needs_no_images(tmp_path):
    out = tmp_path / "synthetic.pt"
    proc = run("rewrite", *TINY, "--init", "fit", "--calibration", "synthetic", "--reconstruct",
               "--reconstruct-steps", "5", "--head", "none", "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "on 256 calibration samples" in proc.stdout and "reconstructed: error" in proc.stdout
    assert out.exists()


def test_reconstruct_without_calibration_is_a_usage_error(tmp_path):
    proc = run("rewrite", *TINY, "--reconstruct", "-o", str(tmp_path / "x.pt"), cwd=tmp_path)
    assert_one_line_error(proc, "--reconstruct needs --calibration DIR")
    assert listing(tmp_path) == []


def test_fit_init_without_calibration_is_a_usage_error(tmp_path):
    proc = run("rewrite", *TINY, "--init", "fit", "-o", str(tmp_path / "x.pt"), cwd=tmp_path)
    assert_one_line_error(proc, "--init fit needs --calibration DIR")
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- distill's speed flags


def _distill_inputs(folder: Path) -> list[str]:
    """A convify checkpoint of tiny_net (student and, read a second time, teacher) and a flat folder of
    8 images: the arguments of a `convify distill` run up to its speed flags."""
    from PIL import Image

    convify.save(convify.convify(tiny_net().eval(), torch.zeros(1, 3, 16, 16)), folder / "ck.pt",
                 arch="cli_factories:tiny_net")
    (folder / "images").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
            folder / "images" / f"{i}.png")
    return ["distill", "ck.pt", "--teacher", "ck.pt", "--data", "images", "-o", "out.pt", "--device", "cpu",
            "--batch-size", "4", "--trust-code"]


def test_distill_speed_flags_reach_convify_distill(tmp_path, monkeypatch, capsys):
    import convify.recovery.distillation as D
    from convify.cli import main

    monkeypatch.chdir(tmp_path)
    args = _distill_inputs(tmp_path)
    calls = []
    real = D.distill
    monkeypatch.setattr(D, "distill", lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1])
    assert main([*args, "--json"]) == 0
    defaults = {k: calls[0][k] for k in ("precision", "channels_last", "workers", "compile")}
    assert defaults == {"precision": "fp32", "channels_last": False, "workers": 0, "compile": False}
    capsys.readouterr()
    precision = "bf16" if D._autocasts("bf16", torch.device("cpu")) is None else "fp32"
    assert main([*args, "-o", "fast.pt", "--json", "--precision", precision, "--channels-last", "--workers",
                 "2"]) == 0
    assert {k: calls[1][k] for k in ("precision", "channels_last", "workers", "compile")} == {
        "precision": precision, "channels_last": True, "workers": 2, "compile": False}
    assert json.loads(capsys.readouterr().out)["history"]["precision"] == [precision]
    assert (tmp_path / "fast.pt").exists()


def _no_compile(monkeypatch):
    def unavailable(module, *args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", unavailable)


def _no_fp16_scaler(monkeypatch):
    class NoScaler(torch.amp.GradScaler):
        def is_enabled(self) -> bool:
            return False

    monkeypatch.setattr(torch.amp, "GradScaler", NoScaler)


@pytest.mark.parametrize("flags, patch, match, code", [
    (["--compile"], _no_compile, r"torch\.compile is not available here \(RuntimeError: no compiler here\); "
                                 r"to train eagerly, leave out --compile$", 1),
    (["--precision", "fp16"], _no_fp16_scaler, r"precision 'fp16' cannot run on cpu \(.*\); choose another "
                                               r"--precision \(fp32 or bf16\) or another --device$", 2),
    (["--workers", "-1"], None, r"distill: workers must be a whole number", 2),
], ids=["compile", "precision", "workers"])
def test_distill_speed_errors_speak_in_flags(tmp_path, monkeypatch, capsys, flags, patch, match, code):
    from convify.cli import main

    monkeypatch.chdir(tmp_path)
    args = _distill_inputs(tmp_path)
    if patch is not None:
        patch(monkeypatch)
    before = _snapshot(tmp_path)
    result = main([*args, *flags])
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(args, result, captured.out, captured.err), match, code)
    assert _snapshot(tmp_path) == before


def test_distill_refuses_an_unknown_precision(tmp_path, capsys):
    from convify.cli import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "ck.pt", "--teacher", "ck.pt", "--data", "images", "-o", "out.pt", "--precision", "half"])
    assert e.value.code == 2
    # argparse quotes the choices in some Python versions, not in others
    assert re.search(r"--precision: invalid choice: 'half' \(choose from '?fp32'?, '?bf16'?, '?fp16'?\)",
                     capsys.readouterr().err)
