"""What does each rewrite cost where it is deployed: onnxruntime CPU latency.

For each model, at its native input size and batch 1, export the original and
each rewrite (pool: conv, depthwise, fold; head: conv, gap, when
``convify.replace_linear_head`` exists) to ONNX, open one onnxruntime CPU
session per graph, and time them **interleaved**: every round runs each
session once, in a rotating order, after a warm-up. Single runs vary by 10%
and more on a shared machine, so the table reports per-session medians and,
as the ratio, the median over rounds of (rewrite time / original time in the
same round). Parameters and multiply-accumulates per image
(``convify.zoo.count_macs``: convolutions and Linears) before and after come
from the PyTorch modules.

Targets: an exact conv head costs at most 1.05x the original's latency;
depthwise pooling at most 1.10x.

    python benchmarks/ort_latency.py [--models resnet18,alexnet] [--rounds 40] [--threads 1]
                                     [--exporter dynamo] [--write]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn as nn
import torchvision

import convify
import convify.api
from convify.export.onnx import export
from convify.zoo import count_macs

# name -> (native size, builder kwargs). A modest list: it runs in a few
# minutes on 2 busy cores. Covered: a flatten head (alexnet), GAP heads
# (resnet18, googlenet), ceil_mode pools (squeezenet1_1), no max pooling
# (mobilenet_v3_small: head rows only).
MODELS: dict[str, tuple[int, dict]] = {
    "resnet18": (224, {}),
    "alexnet": (224, {}),
    "squeezenet1_1": (224, {}),
    "googlenet": (224, {"aux_logits": False, "init_weights": False}),
    "mobilenet_v3_small": (224, {}),
}
POOL_MODES = ("conv", "depthwise", "fold")
HEAD_MODES = ("conv", "gap")


@dataclass
class Variant:
    label: str             # "pool conv", "head gap", "original"
    kind: str              # "pool", "head", ""
    mode: str
    model: nn.Module
    exact: bool
    params: int = 0
    macs: int = 0
    path: Path | None = None
    times: list[float] | None = None
    ratios: list[float] | None = None


# --------------------------------------------------------------------------- counting


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- variants


def build(name: str) -> nn.Module:
    _, kwargs = MODELS[name]
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


def variants(model: nn.Module, x: torch.Tensor, notes: list[str], name: str) -> list[Variant]:
    out = [Variant("original", "", "", model, True)]
    for mode in POOL_MODES:
        rewritten = convify.replace_maxpool(model, x, mode=mode)
        rep = convify.report(rewritten)
        if not rep.replaced:
            notes.append(f"{name}: no max pooling to rewrite")
            break
        label = f"pool {mode}"
        if mode == "fold" and any(r.detail.fold_blocker for r in rep.replaced):
            label += " (some sites fell back to conv)"
        out.append(Variant(label, "pool", mode, rewritten, rep.exact))
    if not hasattr(convify.api, "replace_linear_head"):
        notes.append("convify.replace_linear_head is not available: no head rows")
        return out
    for mode in HEAD_MODES:
        rewritten = convify.replace_linear_head(model, x, mode=mode)
        rep = convify.report(rewritten)
        if not rep.replaced:
            notes.append(f"{name}: no Linear head to rewrite")
            break
        out.append(Variant(f"head {mode}", "head", mode, rewritten, rep.exact))
    return out


# --------------------------------------------------------------------------- timing


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def time_interleaved(vs: list[Variant], x: torch.Tensor, rounds: int, warmup: int, threads: int) -> None:
    sessions = [session(v.path, threads) for v in vs]
    feed = {sessions[0].get_inputs()[0].name: x.numpy()}
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in vs]
    for r in range(rounds):
        order = list(range(len(vs)))
        order = order[r % len(order):] + order[:r % len(order)]  # rotate: no session always runs first
        for i in order:
            start = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append(time.perf_counter() - start)
    base = times[0]
    for v, t in zip(vs, times):
        v.times = t
        v.ratios = [a / b for a, b in zip(t, base)]


# --------------------------------------------------------------------------- report


def fmt_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def target_for(v: Variant) -> float | None:
    """The issue's targets: an exact conv head <= 1.05x, depthwise pooling <= 1.10x."""
    if v.kind == "head" and v.mode == "conv" and v.exact:
        return 1.05
    if v.kind == "pool" and v.mode == "depthwise":
        return 1.10
    return None


def verdict(v: Variant, ratio: float) -> str:
    target = target_for(v)
    if target is None:
        return ""
    return f"<= {target:.2f}x: {'ok' if ratio <= target else 'OVER'}"


def table(rows: list[tuple[str, int, Variant, Variant]]) -> str:
    lines = ["| model | size | rewrite | exact | params before -> after | MACs before -> after | "
             "original ms | rewrite ms | ratio (paired median) | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, size, base, v in rows:
        ratio = statistics.median(v.ratios)
        lines.append(
            f"| {name} | {size} | {v.label} | {'yes' if v.exact else 'no'} | "
            f"{fmt_count(base.params)} -> {fmt_count(v.params)} | {fmt_count(base.macs)} -> {fmt_count(v.macs)} | "
            f"{statistics.median(base.times) * 1e3:.2f} | {statistics.median(v.times) * 1e3:.2f} | "
            f"{ratio:.3f} | {verdict(v, ratio)} |")
    return "\n".join(lines)


def conditions(args: argparse.Namespace, load_before: tuple[float, ...], load_after: tuple[float, ...],
               seconds: float) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"Machine: {cpu}, {os.cpu_count()} cores visible, load average {load_before[0]:.1f} before and "
            f"{load_after[0]:.1f} after (other jobs were running). onnxruntime {ort.__version__} "
            f"CPUExecutionProvider, {args.threads} intra-op thread(s), sequential; torch {torch.__version__}, "
            f"{args.exporter} exporter; batch 1, random weights; {args.warmup} warm-up runs per session, then "
            f"{args.rounds} interleaved rounds (rotating order). Total {seconds:.0f} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--exporter", default="dynamo", choices=("legacy", "dynamo"),
                        help="dynamo (default, what export_onnx uses) folds F.pad into the Conv; legacy keeps a Pad")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    start, load_before = time.perf_counter(), os.getloadavg()
    rows: list[tuple[str, int, Variant, Variant]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convify-ort-latency-") as tmp:
        for name in args.models.split(","):
            size = MODELS[name][0]
            model = build(name)
            x = torch.randn(1, 3, size, size)
            vs = variants(model, x, notes, name)
            for i, v in enumerate(vs):
                v.params, v.macs = count_params(v.model), count_macs(v.model, x)
                v.path = export(v.model, Path(tmp) / f"{name}-{i}.onnx", x, dynamic_batch=False,
                                exporter=args.exporter).path
            time_interleaved(vs, x, args.rounds, args.warmup, args.threads)
            rows += [(name, size, vs[0], v) for v in vs[1:]]
            print(f"{name}: " + ", ".join(f"{v.label} {statistics.median(v.ratios):.3f}x" for v in vs[1:]),
                  file=sys.stderr, flush=True)
            for v in vs:
                v.model = None  # free the weights before the next model
    text = "\n\n".join([
        "## onnxruntime CPU latency of each rewrite (`benchmarks/ort_latency.py`)",
        conditions(args, load_before, os.getloadavg(), time.perf_counter() - start),
        table(rows),
        "\n".join(f"- {n}" for n in dict.fromkeys(notes)),
    ]) + "\n"
    print(text)
    if args.write:
        from results import write_section  # noqa: PLC0415  (benchmarks/results.py, beside this script)

        write_section(f"ort-{args.exporter}", text)


if __name__ == "__main__":
    main()
