"""Dense evaluation of a fully-convolutional classifier against crop-by-crop evaluation.

``convify.replace_linear_head(model, dense=True)`` turns AlexNet's and VGG's
Linear heads into convolutions, so one pass over a 451x451 image gives an 8x8
map of class scores (Caffe's net_surgery example). The baseline runs the
original model on every 224x224 crop at the map's stride (32 px), all crops
batched in one call. Printed per model:

* the time ratio (crops / dense, best of ``--repeats`` interleaved runs),
* the multiply-accumulate ratio, the limit of that speed-up (the dense pass
  shares the overlapping convolutions; its head runs the same GEMMs),
* their quotient (the target is at least 80%),
* the deviation at matching positions: ``max|dense - crop| / max|crop|`` and
  how often the top class agrees. Padded convolutions see neighbouring pixels
  in the dense pass where a crop sees zeros, so the deviation is not zero.

Also timed: the dense model with plain ``nn.Conv2d`` head layers (what oneDNN's
direct convolution gives) to show why convify's head convolution runs as a
GEMM on CPU.

    python benchmarks/dense.py                 # alexnet and vgg11, 2 threads
    python benchmarks/dense.py --models alexnet --repeats 20

With ``--write`` the table replaces its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

import convify
from convify.zoo import count_macs

NATIVE = 224
IMAGE = 451


def plain_head(dense: nn.Module) -> nn.Module:
    """A copy of ``dense`` whose head convolutions are plain ``nn.Conv2d``."""
    import copy
    out = copy.deepcopy(dense)
    for name, m in list(out.named_modules()):
        if type(m).__name__ == "HeadConv2d":
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, bias=m.bias is not None)
            plain.load_state_dict(m.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, plain)
    if hasattr(out, "recompile"):
        out.recompile()
    return out


def best_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Interleaved timings (one warm-up each), so that load changes hit every variant alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    return times


def measure(name: str, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    dense = convify.replace_linear_head(model, torch.randn(1, 3, NATIVE, NATIVE), dense=True)
    assert convify.report(dense).exact, convify.report(dense)
    image = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        scores = dense(image)
    rows, cols = scores.shape[-2:]
    stride = (IMAGE - NATIVE) // (rows - 1)
    with torch.no_grad():  # the map's stride: one more step of input gives one more position
        assert dense(torch.randn(1, 3, NATIVE + stride, NATIVE + stride)).shape[-1] == 2
    crops = torch.cat([image[:, :, i * stride:i * stride + NATIVE, j * stride:j * stride + NATIVE]
                       for i in range(rows) for j in range(cols)])
    plain = plain_head(dense)
    times = best_times({"dense": lambda: dense(image), "crops": lambda: model(crops),
                        "plain": lambda: plain(image)}, repeats)
    with torch.no_grad():
        per_crop = model(crops)                                  # (rows*cols, K)
    at_positions = scores[0].flatten(1).t()                      # (rows*cols, K)
    deviation = float((at_positions - per_crop).abs().max() / per_crop.abs().max())
    agree = float((at_positions.argmax(1) == per_crop.argmax(1)).float().mean())
    mac_dense = count_macs(dense, image)
    mac_crops = count_macs(model, crops)
    t_dense, t_crops, t_plain = (min(times[k]) for k in ("dense", "crops", "plain"))
    return {
        "model": name, "map": f"{rows}x{cols}", "stride": stride, "crops": rows * cols,
        "t_crops": t_crops, "t_dense": t_dense, "t_plain": t_plain,
        "t_dense_median": statistics.median(times["dense"]), "t_crops_median": statistics.median(times["crops"]),
        "time_ratio": t_crops / t_dense, "mac_ratio": mac_crops / mac_dense,
        "plain_ratio": t_crops / t_plain, "gmac_dense": mac_dense / 1e9, "gmac_crops": mac_crops / 1e9,
        "deviation": deviation, "agree": agree,
    }


def table(results: list[dict[str, object]]) -> str:
    head = ("| model | map (stride) | crops | crops s | dense s | time ratio | MAC ratio (GMAC) | time/MAC | "
            "dense, plain Conv2d head: s, ratio | max dev / max | top-1 agree |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['map']} ({r['stride']} px) | {r['crops']} | {r['t_crops']:.2f} | "
            f"{r['t_dense']:.3f} | {r['time_ratio']:.2f} | {r['mac_ratio']:.2f} ({r['gmac_crops']:.1f} / "
            f"{r['gmac_dense']:.2f}) | {r['time_ratio'] / r['mac_ratio']:.0%} | {r['t_plain']:.3f}, "
            f"{r['plain_ratio']:.2f} | {r['deviation']:.3f} | {r['agree']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "vgg11"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved runs per model (default: 10 for alexnet, 3 for the others)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = {name: args.repeats or (10 if name == "alexnet" else 3) for name in args.models}
    load_before = os.getloadavg()[0]
    results = [measure(name, repeats[name]) for name in args.models]
    load_after = os.getloadavg()[0]
    text = table(results)
    cpu = platform.processor() or platform.machine()
    intro = (f"## Dense evaluation ({IMAGE}x{IMAGE} image, {NATIVE}x{NATIVE} crops at the map's stride, "
             f"all crops in one batch)\n\n"
             f"`python benchmarks/dense.py` on {cpu}, {args.threads} threads, torch {torch.__version__}; "
             f"best of {', '.join(f'{n}: {r}' for n, r in repeats.items())} interleaved runs; load average "
             f"{load_before:.1f} before, {load_after:.1f} after (other processes share the cores). time/MAC is the time ratio over the "
             "multiply-accumulate ratio (target: at least 80%). Weights are random (default init); "
             "max dev / max compares the score map with the crops' outputs at the same positions.\n\n")
    print(intro + text)
    if args.write:
        from results import write_section  # noqa: PLC0415  (benchmarks/results.py, beside this script)

        write_section("dense", intro + text)


if __name__ == "__main__":
    main()
