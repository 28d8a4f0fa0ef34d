"""Every example under examples/ runs with --quick (synthetic data, no system package) and writes what it says.

Each example runs as a subprocess, the way a user runs it, into a temporary
folder; the committed artefacts in examples/ are left alone.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARTEFACTS = ("all_cnn_fashion_mnist.png", "all_cnn_fashion_mnist.md", "dense_heatmap.png", "dense_heatmap_large.png",
             "class_activation_map.png")


def run_example(name: str, out: Path) -> str:
    """Run ``examples/<name> --quick`` into ``out``; returns its stdout, fails with its output on an error."""
    env = dict(os.environ, MPLBACKEND="Agg", FASHION_MNIST_DIR=str(out / "no-dataset-here"))
    result = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def missing_class_colours(path: Path) -> list[str]:
    """The classes whose colour (``CLASS_COLOURS`` of examples/dense_heatmap.py) no patch of ``path`` shows.

    A legend patch is a few hundred pixels of its class's exact colour.
    """
    from matplotlib.colors import to_rgb
    from PIL import Image

    sys.path.insert(0, str(EXAMPLES))
    try:
        example = importlib.import_module("dense_heatmap")
    finally:
        sys.path.remove(str(EXAMPLES))
    counts = {colour: n for n, colour in Image.open(path).convert("RGB").getcolors(1 << 24)}
    wanted = {name: tuple(round(255 * v) for v in to_rgb(c)) for name, c in zip(example._data.CLASSES,
                                                                                example.CLASS_COLOURS)}
    return [name for name, colour in wanted.items() if counts.get(colour, 0) < 100]


def assert_small_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert 5_000 < len(data) < 200_000, f"{path}: {len(data)} bytes"


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table of ``text``, each a list of rows keyed by its header's column names."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if block:
            header, _, *rows = block
            tables.append([dict(zip(header, row)) for row in rows])
            block = []
    return tables


def test_all_cnn_fashion_mnist(tmp_path: Path) -> None:
    stdout = run_example("all_cnn_fashion_mnist.py", tmp_path)
    assert "synthetic stand-in" in stdout
    assert_small_png(tmp_path / "all_cnn_fashion_mnist.png")
    results, paper = markdown_tables((tmp_path / "all_cnn_fashion_mnist.md").read_text())
    assert [r["model"] for r in results] == [
        "Model C (max pooling)", "Strided-CNN-C (fold)", "All-CNN-C (conv)", "Model C -> all-conv, exact (mode=exact)",
        "Model C -> All-CNN-C, reconstructed + distilled"]
    macs = {r["model"]: int(r["multiply-accumulates / image"].replace(",", "")) for r in results}
    # fold computes the first block's second convolution at the pooled size; conv adds the pooling convolutions
    assert macs["Strided-CNN-C (fold)"] < macs["Model C (max pooling)"] < macs["All-CNN-C (conv)"]
    assert macs["All-CNN-C (conv)"] == macs["Model C -> All-CNN-C, reconstructed + distilled"]
    # the rewrite's budget is Model C's epochs plus the distillation's (--quick: 2 + 1)
    assert [r["training epochs"] for r in results] == ["2", "2", "2", "2 + 0", "2 + 1"]
    # the exact rewrite of the trained Model C: Model C's accuracy, every prediction kept, no data
    exact = next(r for r in results if r["model"].endswith("(mode=exact)"))
    assert exact["test accuracy"] == results[0]["test accuracy"] and "top-1 agreement with Model C 100.00%" in \
        exact["training"]
    assert macs["Model C (max pooling)"] < macs["Model C -> all-conv, exact (mode=exact)"]
    # beside Table 3 of the paper, ours as 100 - accuracy
    errors = {r["model"]: r for r in paper}
    assert [errors[m]["paper: CIFAR-10 error"] for m in ("Model C", "Strided-CNN-C", "ConvPool-CNN-C", "All-CNN-C")] \
        == ["9.74%", "10.19%", "9.31%", "9.08%"]
    assert errors["ConvPool-CNN-C"]["here: synthetic stand-in error"] == "not trained here"
    for ours, theirs in (("Model C (max pooling)", "Model C"), ("All-CNN-C (conv)", "All-CNN-C")):
        accuracy = float(next(r for r in results if r["model"] == ours)["test accuracy"].rstrip("%"))
        assert float(errors[theirs]["here: synthetic stand-in error"].rstrip("%")) == pytest.approx(100 - accuracy,
                                                                                                   abs=0.011)
    assert "In the paper All-CNN-C has 0.66 points less error than Model C" in stdout
    assert "the same as Model C, with no data and no training" in stdout


def test_dense_heatmap(tmp_path: Path) -> None:
    stdout = run_example("dense_heatmap.py", tmp_path)
    assert_small_png(tmp_path / "dense_heatmap.png")
    assert "maps (10, 22, 22)" in stdout
    hits = re.search(r"item's class: (\d+)/(\d+)", stdout)
    assert hits, stdout
    assert int(hits[1]) > 0.5 * int(hits[2]), stdout  # the stand-in is easy: chance would be 10%
    large = re.search(r"large canvas 256x256: (\d+) tiles .* max dev / max ([0-9.e+-]+)", stdout)
    assert large and int(large[1]) > 1 and float(large[2]) <= 1e-5, stdout  # tiled, and equal to one pass
    zoom = re.search(r"zoomed region 128x128 px .*: (\d+)/(\d+);", stdout)
    assert zoom and 0 < int(zoom[2]) < 25 and int(zoom[1]) > 0.5 * int(zoom[2]), stdout  # a part, named
    assert_small_png(tmp_path / "dense_heatmap_large.png")
    assert missing_class_colours(tmp_path / "dense_heatmap_large.png") == []  # the legend


def test_committed_large_canvas_picture_has_a_legend() -> None:
    assert missing_class_colours(EXAMPLES / "dense_heatmap_large.png") == []


def test_class_activation_map(tmp_path: Path) -> None:
    stdout = run_example("class_activation_map.py", tmp_path)
    assert_small_png(tmp_path / "class_activation_map.png")
    errors = [float(e) for e in re.findall(r"relative error (\S+)", stdout)]
    assert len(errors) == 2, stdout
    assert max(errors) <= 1e-5, stdout  # mode="gap" is exact on a GAP -> Linear head, and so is each CAM's mean


@pytest.mark.parametrize("name", ARTEFACTS)
def test_committed_artefacts_are_small(name: str) -> None:
    path = EXAMPLES / name
    assert path.is_file(), f"{path} missing: run the example without --quick to make it"
    if name.endswith(".png"):
        assert_small_png(path)
