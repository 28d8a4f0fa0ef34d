"""Which exact max tree is faster: direct (whole window, then 1x1s), separable (an axis at a time) or depthwise?

Eager PyTorch on the CPU, batch 1, one thread by default. For each real pooling
shape (resnet18's, vgg11's, googlenet's), the max pooling itself and the
trees that ``mode="exact"`` can build (:func:`convify.fx.rewrites.maxpool.exact.exact_tree`),
signed (two channels per carried value, replicated borders) and for an input
>= 0 (one channel, zero padding inside the convolutions), run **interleaved**:
every round runs each candidate once in a rotating order, after a warm-up;
the table reports medians over rounds of (candidate / max pooling) in the
same round. Prints a table; writes nothing.

    python benchmarks/exact_pool.py [--rounds 30] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from convify.core.maxtree import TreeForm
from convify.core.rewrites.maxpool import PoolParams
from convify.fx.rewrites.maxpool.exact import exact_tree

# (where, channels, size, kernel, stride, padding, ceil_mode)
SHAPES = [
    ("resnet18 maxpool", 64, 112, 3, 2, 1, False),
    ("vgg11 features.2", 64, 224, 2, 2, 0, False),
    ("vgg11 features.5", 128, 112, 2, 2, 0, False),
    ("googlenet maxpool1", 64, 112, 3, 2, 0, True),
    ("googlenet maxpool2", 192, 56, 3, 2, 0, True),
    ("googlenet 3a branch4", 192, 28, 3, 1, 1, True),
    ("googlenet 4a branch4", 480, 14, 3, 1, 1, True),
    ("googlenet 5a branch4", 832, 7, 3, 1, 1, True),
]


def time_round(fns: dict, x: dict, order: list[str]) -> dict[str, float]:
    out = {}
    for name in order:
        start = time.perf_counter()
        fns[name](x[name])
        out[name] = time.perf_counter() - start
    return out


def measure(channels: int, size: int, k: int, s: int, p: int, ceil_mode: bool, rounds: int) -> dict[str, float]:
    params = PoolParams.of(2, k, s, p, 1, ceil_mode, False)
    g = torch.Generator().manual_seed(0)
    signed_x = torch.randn(1, channels, size, size, generator=g)
    fns, inputs = {"maxpool": params.pool}, {"maxpool": signed_x}
    for signed in (True, False):
        for form in TreeForm:
            tree, _ = exact_tree(params, channels, signed=signed, form=form, dtype=torch.float32)
            name = f"{form.value} {'signed' if signed else '>=0'}"
            fns[name], inputs[name] = tree.eval(), signed_x if signed else signed_x.relu()
    names = list(fns)
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "maxpool"}
    with torch.no_grad():
        for r in range(rounds + 3):
            times = time_round(fns, inputs, names[r % len(names):] + names[:r % len(names)])
            if r >= 3:  # warm-up
                for n in ratios:
                    ratios[n].append(times[n] / times["maxpool"])
    return {n: statistics.median(v) for n, v in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = None
    for where, c, n, k, s, p, ceil_mode in SHAPES:
        row = measure(c, n, k, s, p, ceil_mode, args.rounds)
        if header is None:
            header = ["pool", "shape", *row]
            print(" | ".join(header))
            print(" | ".join("---" for _ in header))
        shape = f"{c}x{n}x{n} k{k} s{s}" + (" ceil" if ceil_mode else "")
        print(" | ".join([where, shape, *(f"{v:.2f}x" for v in row.values())]), flush=True)
    print(f"\neager PyTorch {torch.__version__}, CPU, batch 1, {args.threads} thread(s), median over "
          f"{args.rounds} interleaved rounds of (tree time / max pooling time)")


if __name__ == "__main__":
    main()
