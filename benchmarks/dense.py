"""Dense evaluation of a fully-convolutional classifier against crop-by-crop evaluation.

``convify.replace_linear_head(model, dense=True)`` turns AlexNet's and VGG's
Linear heads into convolutions, so one pass over a 451x451 image gives an 8x8
map of class scores (Caffe's net_surgery example). The baseline runs the
original model on every 224x224 crop at the map's stride (32 px), all crops
batched in one call. The dense model runs twice, side by side:

* **plain**: as ``replace_linear_head`` returns it, the head's layers plain
  ``nn.Conv2d`` (the default: what runs is what is exported);
* **GEMM**: after the opt-in ``convify.matmul_heads``, which runs those
  layers as ``unfold`` + one matrix multiply on CPU.

Printed per model:

* the time ratio (crops / dense, best of ``--repeats`` interleaved runs) for
  both, and its median,
* the multiply-accumulate ratio, the limit of that speed-up (the dense pass
  shares the overlapping convolutions; its head runs the same GEMMs),
* their quotient, time/MAC (the target is at least 80%),
* the deviation at matching positions: ``max|dense - crop| / max|crop|`` and
  how often the top class agrees. Padded convolutions see neighbouring pixels
  in the dense pass where a crop sees zeros, so the deviation is not zero.

A second table times one 224x224 image (batch 1), the native size, where the
head reads a map no larger than its kernel: the original model (Linear head)
against the rewritten one with plain and with GEMM heads. A third times single
layers, ``F.conv2d`` against ``conv2d_as_matmul``, on head shapes (and one body
convolution for contrast): where the opt-in pays and where it would not.

    python benchmarks/dense.py                 # alexnet and vgg11, 2 threads
    python benchmarks/dense.py --models alexnet --repeats 20

With ``--write`` the tables replace their section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import convify
from convify.dense.matmul import conv2d_as_matmul
from convify.zoo import count_macs

NATIVE = 224
IMAGE = 451
TARGET = 0.8  # time/MAC

#: Single layers: (what, batch, in channels, map size, out channels, kernel).
LAYERS = [
    ("alexnet fc6, 224, batch 1", 1, 256, 6, 4096, 6),
    ("alexnet fc6, 224, batch 64", 64, 256, 6, 4096, 6),
    ("alexnet fc6, 451 dense", 1, 256, 13, 4096, 6),
    ("alexnet fc7 (1x1), 224, batch 1", 1, 4096, 1, 4096, 1),
    ("alexnet fc7 (1x1), 451 dense", 1, 4096, 8, 4096, 1),
    ("vgg11 fc6, 224, batch 1", 1, 512, 7, 4096, 7),
    ("vgg11 fc6, 451 dense", 1, 512, 14, 4096, 7),
    ("resnet18 fc (1x1), 224, batch 1", 1, 512, 1, 1000, 1),
    ("resnet18 fc (1x1), 224, batch 64", 64, 512, 1, 1000, 1),
    ("resnet18 fc (1x1), 448 dense, batch 8", 8, 512, 14, 1000, 1),
    ("a body conv: 3x3, 64 channels, 56x56", 1, 64, 56, 64, 3),
]


def interleaved_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Interleaved timings (one warm-up each, the order rotating every round),
    so that load changes hit every variant alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for i in range(repeats):
            for k in names[i % len(names):] + names[:i % len(names)]:
                start = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - start)
    return times


def measure(name: str, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    plain = convify.replace_linear_head(model, torch.randn(1, 3, NATIVE, NATIVE), dense=True)
    assert convify.report(plain).exact, convify.report(plain)
    heads = [n for row in convify.report(plain).replaced for n in row.detail.linears]
    assert all(type(plain.get_submodule(n)) is nn.Conv2d for n in heads)
    gemm = convify.matmul_heads(plain)
    image = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        scores = plain(image)
        gemm_gap = float((gemm(image) - scores).abs().max() / scores.abs().max())
    assert gemm_gap <= 1e-4, gemm_gap
    rows, cols = scores.shape[-2:]
    stride = (IMAGE - NATIVE) // (rows - 1)
    with torch.no_grad():  # the map's stride: one more step of input gives one more position
        assert plain(torch.randn(1, 3, NATIVE + stride, NATIVE + stride)).shape[-1] == 2
    crops = torch.cat([image[:, :, i * stride:i * stride + NATIVE, j * stride:j * stride + NATIVE]
                       for i in range(rows) for j in range(cols)])
    dense_times = interleaved_times({"crops": lambda: model(crops), "plain": lambda: plain(image),
                                     "gemm": lambda: gemm(image)}, repeats)
    one = torch.randn(1, 3, NATIVE, NATIVE)
    native_times = interleaved_times({"linear": lambda: model(one), "plain": lambda: plain(one),
                                      "gemm": lambda: gemm(one)}, 4 * repeats)
    with torch.no_grad():
        per_crop = model(crops)                                  # (rows*cols, K)
    at_positions = scores[0].flatten(1).t()                      # (rows*cols, K)
    mac_dense, mac_crops = count_macs(plain, image), count_macs(model, crops)
    best = {k: min(v) for k, v in dense_times.items()}
    median = {k: statistics.median(v) for k, v in dense_times.items()}
    return {
        "model": name, "map": f"{rows}x{cols}", "stride": stride, "crops": rows * cols, "repeats": repeats,
        "best": best, "median": median, "mac_ratio": mac_crops / mac_dense,
        "gmac_dense": mac_dense / 1e9, "gmac_crops": mac_crops / 1e9,
        "native_best": {k: min(v) for k, v in native_times.items()},
        "native_median": {k: statistics.median(v) for k, v in native_times.items()},
        "deviation": float((at_positions - per_crop).abs().max() / per_crop.abs().max()),
        "agree": float((at_positions.argmax(1) == per_crop.argmax(1)).float().mean()), "gemm_gap": gemm_gap,
    }


def measure_layers(repeats: int) -> list[tuple[str, float, float]]:
    """(what, conv s, GEMM s) of each of :data:`LAYERS`, best of ``repeats`` interleaved runs."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for what, n, c, size, k, kernel in LAYERS:
        x = torch.randn(n, c, size, size, generator=g)
        w, b = torch.randn(k, c, kernel, kernel, generator=g), torch.randn(k, generator=g)
        times = interleaved_times({"conv": lambda: F.conv2d(x, w, b), "gemm": lambda: conv2d_as_matmul(x, w, b)},
                                  repeats)
        rows.append((what, min(times["conv"]), min(times["gemm"])))
    return rows


def layer_table(rows: list[tuple[str, float, float]]) -> str:
    lines = ["| layer | F.conv2d ms | conv2d_as_matmul ms | GEMM speed-up |", "|---|---|---|---|"]
    lines += [f"| {what} | {conv * 1e3:.2f} | {gemm * 1e3:.2f} | {conv / gemm:.2f}x |" for what, conv, gemm in rows]
    return "\n".join(lines)


def _ratio(r: dict[str, object], variant: str, stat: str = "best") -> float:
    return r[stat]["crops"] / r[stat][variant]


def dense_table(results: list[dict[str, object]]) -> str:
    head = ("| model | map (stride) | crops | MAC ratio (GMAC crops / dense) | crops s | dense plain s | "
            "dense GEMM s | time ratio plain (median) | time ratio GEMM (median) | time/MAC plain | "
            "time/MAC GEMM | GEMM / plain speed-up | max dev / max | top-1 agree |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        b = r["best"]
        plain, gemm = _ratio(r, "plain"), _ratio(r, "gemm")
        lines.append(
            f"| {r['model']} | {r['map']} ({r['stride']} px) | {r['crops']} | {r['mac_ratio']:.2f} "
            f"({r['gmac_crops']:.1f} / {r['gmac_dense']:.2f}) | {b['crops']:.2f} | {b['plain']:.3f} | "
            f"{b['gemm']:.3f} | {plain:.2f} ({_ratio(r, 'plain', 'median'):.2f}) | {gemm:.2f} "
            f"({_ratio(r, 'gemm', 'median'):.2f}) | {plain / r['mac_ratio']:.0%} | {gemm / r['mac_ratio']:.0%} | "
            f"{b['plain'] / b['gemm']:.2f}x | {r['deviation']:.3f} | {r['agree']:.0%} |")
    return "\n".join(lines)


def native_table(results: list[dict[str, object]]) -> str:
    head = ("| model | original (Linear head) ms | plain Conv2d head ms (x original) | GEMM head ms (x original) | "
            "medians: original, plain, GEMM ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        b, m = r["native_best"], r["native_median"]
        lines.append(
            f"| {r['model']} | {b['linear'] * 1e3:.1f} | {b['plain'] * 1e3:.1f} ({b['plain'] / b['linear']:.2f}x) | "
            f"{b['gemm'] * 1e3:.1f} ({b['gemm'] / b['linear']:.2f}x) | {m['linear'] * 1e3:.1f}, "
            f"{m['plain'] * 1e3:.1f}, {m['gemm'] * 1e3:.1f} |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, object]]) -> str:
    lines = []
    for r in results:
        for variant, label in (("plain", "plain Conv2d heads (default)"), ("gemm", "GEMM heads (matmul_heads)")):
            share = _ratio(r, variant) / r["mac_ratio"]
            lines.append(f"- {r['model']}, {label}: time/MAC {share:.0%}: "
                         f"**{'met' if share >= TARGET else 'missed'}** (target {TARGET:.0%})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "vgg11"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved dense runs per model, 4x as many at the native size "
                             "(default: 10 for alexnet, 3 for the others)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = {name: args.repeats or (10 if name == "alexnet" else 3) for name in args.models}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = [measure(name, repeats[name]) for name in args.models]
    layers = measure_layers(2 * max(repeats.values()))
    load_after = os.getloadavg()[0]
    cpu = platform.processor() or platform.machine()
    intro = (f"## Dense evaluation ({IMAGE}x{IMAGE} image, {NATIVE}x{NATIVE} crops at the map's stride, "
             f"all crops in one batch)\n\n"
             f"`python benchmarks/dense.py` on {cpu}, {args.threads} thread{'s' if args.threads != 1 else ''}, "
             f"torch {torch.__version__}; "
             f"best of {', '.join(f'{n}: {r}' for n, r in repeats.items())} interleaved runs (4x as many at "
             f"the native size); load average {load_before:.1f} before, {load_after:.1f} after (other "
             f"processes share the cores); {time.perf_counter() - start:.0f} s. *plain*: the dense model as "
             "`replace_linear_head(dense=True)` returns it, its head layers `nn.Conv2d`; *GEMM*: the same "
             "model after the opt-in `convify.matmul_heads` (same weights; eager CPU runs `unfold` + one "
             "matrix multiply). Time ratio: crops / dense; time/MAC: the time ratio over the "
             "multiply-accumulate ratio (target: at least 80%). Weights are random (default init); "
             "max dev / max compares the score map with the crops' outputs at the same positions.\n\n")
    native = (f"\n\nOne {NATIVE}x{NATIVE} image (batch 1), the native size: the original model against the "
              "rewritten one (best of the interleaved runs).\n\n")
    single = (f"\n\nSingle layers, eager CPU, best of {2 * max(repeats.values())} interleaved runs: oneDNN's "
              "convolution against `unfold` + one GEMM (what `MatmulConv2d` runs).\n\n")
    text = (intro + dense_table(results) + "\n\n" + verdicts(results) + native + native_table(results) + single
            + layer_table(layers))
    print(text)
    if args.write:
        from results import write_section  # noqa: PLC0415  (benchmarks/results.py, beside this script)

        write_section("dense", text)


if __name__ == "__main__":
    main()
