"""The architecture, checked: the layers and contracts declared in pyproject.toml hold
(import-linter), the core knows no graph type, no module grows past 500 lines, and
a 0.2.0 pickle still loads through the old module paths."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest
import torch
from import_contracts import ForbiddenSubmoduleContract, imports_submodule

import convify

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(convify.__file__).parent
DATA = Path(__file__).parent / "data"


def test_every_contract_in_pyproject_is_kept():
    # In a process of its own: import-linter configures logging (and would silence convify's loggers for the
    # tests that run after it).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                                    os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout and "The core knows no graph type: no torch.fx KEPT" in proc.stdout


@pytest.mark.parametrize("line, imports", [
    ("import torch.fx as fx", True), ("import torch.fx", True), ("from torch.fx import Node", True),
    ("from torch.fx.node import Node", True), ("from torch import fx", True), ("from torch import (nn, fx)", True),
    ("import torch", False), ("import torch.nn as nn", False), ("from torch.fxx import a", False),
    ("from torch import fxy", False), ("from torch import nn  # fx", False),
])
def test_the_submodule_contract_reads_import_lines(line, imports):
    assert imports_submodule(line, "torch.fx") is imports


def test_the_submodule_contract_breaks_on_a_core_that_imports_torch_fx(tmp_path, monkeypatch):
    package = tmp_path / "toypkg"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "clean.py").write_text("import torch\nimport torch.nn as nn\n")
    (package / "core" / "leaky.py").write_text(textwrap.dedent("""\
        import torch

        def lazy():
            from torch import fx  # a lazy import counts too
            return fx
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("toypkg", include_external_packages=True, cache_dir=None)
    contract = ForbiddenSubmoduleContract("toy", {}, {"source_modules": ["toypkg.core"],
                                                      "forbidden_modules": ["torch.fx"]})
    check = contract.check(graph, verbose=False)
    assert not check.kept
    assert [(b["module"], b["line"]) for b in check.metadata["broken"]] == [("toypkg.core.leaky", 4)]


def test_the_core_imports_no_graph_type_when_imported_alone():
    """Importing the core (its registry loads every built-in spec) loads no ONNX
    package and none of convify's frontends; torch itself is allowed."""
    code = ("import sys, convify.core.registry, convify.core.metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript', "
            "'onnx_ir') or m.startswith(('convify.fx', 'convify.export', 'convify.recovery', 'convify.dense'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"


def test_a_whole_model_pickled_by_0_2_0_still_loads():
    """tests/data/whole_model_0.2.0.pt was written by convify 0.2.0 (main at 86e914d): ``torch.save`` of a
    rewritten Net (conv, MaxPool2d, Linear) after ``convify.convify(..., pool="conv", head="conv")`` and
    ``convify.matmul_heads``, with a ``PadSame`` attached, with its input and output. It names
    ``convify.graph.ConvifyTracer``, ``convify.rewrites.maxpool.PadSame``/``PoolRecord``/``PoolParams``/
    ``PoolOutcome``, ``convify.head_matmul.MatmulConv2d``, ``convify.rewrites.head.HeadRecord`` and
    ``convify.report.Report``, all of which moved."""
    saved = torch.load(DATA / "whole_model_0.2.0.pt", weights_only=False)
    model = saved["model"]
    assert type(model.pad_same).__module__ == "convify.fx.rewrites.maxpool.same"
    assert type(model.fc).__name__ == "MatmulConv2d"
    with torch.no_grad():
        assert torch.equal(model(saved["input"]), saved["output"])
    # 0.2.0 itself lost the report of a whole pickled GraphModule (torch rebuilds it without the attribute);
    # the records in the pickle must still unpickle, which the load above proves.


def test_every_old_path_answers_from_modules_that_exist():
    from convify._moved import MOVED

    for old, homes in MOVED.items():
        module = __import__(old, fromlist=["_"])
        assert module.__name__ == old
        for home in homes:
            __import__(home)
    from convify.graph import ConvifyTracer, check_traced_branch  # noqa: F401
    from convify.rewrites.maxpool import PadSame, PoolRecord  # noqa: F401  (as a 0.2.0 pickle finds them)
    with pytest.raises(AttributeError, match="convify.rewrites.maxpool.*has no attribute 'Nope'"):
        __import__("convify.rewrites.maxpool", fromlist=["_"]).Nope
