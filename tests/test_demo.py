"""`convify demo`, the README's first command, runs and every check in it holds."""
from __future__ import annotations

import subprocess
import sys


def test_demo_runs_every_check():
    proc = subprocess.run([sys.executable, "-m", "convify", "demo"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("(ok)") == 5  # three avg-init checks, the exact dense head and the exact pooling
    assert "a 320x320 image gives a 1000x4x4 map" in out
    assert "replace_maxpool(mode='exact')" in out and "the exact rewrite computes the original's function" in out
    assert out.count("convify verify: PASSED") == 3
    assert "equivalence (exact rewrite)" in out  # Model C with pool="exact", verified in onnxruntime
    assert out.rstrip().endswith("demo: every check held")
    # the ONNX files live in a folder the demo removes: their names only, said to be temporary
    exported = [line for line in out.splitlines() if line.startswith("exported ")]
    assert len(exported) == 3 and all("in a temporary folder removed when the demo ends" in line for line in exported)
    assert "convify-demo-" not in out
    assert " max poolings computed" in out and "its 1 max poolings" not in out
