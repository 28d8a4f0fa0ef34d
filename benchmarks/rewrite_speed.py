"""How much does replace_maxpool cost beyond the work no rewrite can avoid?

For each torchvision model with max pooling, at its native input size, time in
the same process: (a) the floor, copying the model and a bare
``torch.fx.symbolic_trace`` of the copy; (b) ``convify.replace_maxpool`` with
the example input given. Prints medians and their ratio (target: <= 3x) as a
markdown table; ``--write`` replaces its section of benchmarks/RESULTS.md.

    python benchmarks/rewrite_speed.py [--repeats 5] [--write]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.fx as fx
import torchvision

import convify

MODELS = {
    "resnet18": (224, {}), "vgg11": (224, {}), "alexnet": (224, {}),
    "googlenet": (224, {"aux_logits": False, "init_weights": False}),
    "inception_v3": (299, {"aux_logits": False, "init_weights": False}),
    "squeezenet1_0": (224, {}), "squeezenet1_1": (224, {}), "densenet121": (224, {}),
    "shufflenet_v2_x0_5": (224, {}),
}


def floor_once(model: torch.nn.Module) -> float:
    start = time.perf_counter()
    fx.symbolic_trace(copy.deepcopy(model))
    return time.perf_counter() - start


def rewrite_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    convify.replace_maxpool(model, x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = ["| model | input | copy + trace (ms) | replace_maxpool (ms) | ratio |", "|---|---|---|---|---|"]
    for name, (size, kwargs) in MODELS.items():
        model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        x = torch.randn(1, 3, size, size)
        rewrite_once(model, x)  # warm-up: first calls pay for imports and allocator growth
        floors, rewrites = [], []
        for _ in range(args.repeats):  # interleaved, so drifts hit both alike
            floors.append(floor_once(model))
            rewrites.append(rewrite_once(model, x))
        f, r = statistics.median(floors), statistics.median(rewrites)
        rows.append(f"| {name} | {size} | {f * 1e3:.0f} | {r * 1e3:.0f} | {r / f:.2f}x |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.write:
        from results import write_section  # noqa: PLC0415  (benchmarks/results.py, beside this script)

        load = os.getloadavg()[0]
        write_section("rewrite_speed", f"## replace_maxpool against its floor (`benchmarks/rewrite_speed.py`)\n\n"
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved "
                      f"repeats, medians, load average {load:.1f} at the end. The floor is `copy.deepcopy` plus a "
                      f"bare `torch.fx.symbolic_trace`; target: replace_maxpool at most 3x the floor.\n\n{table}")


if __name__ == "__main__":
    main()
