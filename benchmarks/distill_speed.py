"""How fast does ``convify.distill`` train, against a minimal hand-written loop?

Teacher: ``convify.zoo.model_c(16, in_channels=1, batch_norm=True,
hidden_1x1=False)`` (the Model C of benchmarks/recovery.py); student: its
``replace_maxpool`` rewrite. Data: random 28x28 images with labels (8,192 by
default) in a ``TensorDataset``. Both sides train one epoch from the same
student weights with the same batch (256), shuffling DataLoader, Adam and lr,
and the same loss (``alpha * T^2 * KL + (1 - alpha) * CE`` at T=4, alpha=0.9,
written out again here). ``distill`` runs with ``val_data=None`` and
``progress=False``, so that neither side validates or draws a bar; its
learning-rate schedule and metrics stay on (the hand-written loop has neither:
they are part of what distill costs). Runs alternate (distill first in even
repeats, the loop first in odd ones), in one process; each is timed from the
call to the end of its epoch, the device synchronized. Reported: median images
per second of each, and the ratio distill / hand-written (target: at least 90%).

    python benchmarks/distill_speed.py --threads 2 --repeats 5
    python benchmarks/distill_speed.py --device cuda --precision bf16
    python benchmarks/distill_speed.py --threads 2 --write   # replaces its section of RESULTS.md
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import convify
from convify.recovery.distillation import PRECISIONS
from convify.zoo import model_c

BATCH, LR, TEMPERATURE, ALPHA, TARGET = 256, 1e-3, 4.0, 0.9, 0.90


def models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = model_c(16, in_channels=1, batch_norm=True, hidden_1x1=False).eval()
    return teacher, convify.replace_maxpool(teacher, torch.zeros(1, 1, 28, 28))


def dataset(images: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(images, 1, 28, 28, generator=g), torch.randint(0, 10, (images,), generator=g))


def hand_written(teacher: nn.Module, student: nn.Module, data: TensorDataset, device: torch.device,
                 precision: str) -> None:
    """One epoch of distillation as one writes it by hand: no schedule, no metrics, no checks."""
    teacher.to(device).eval()
    student.to(device).train()
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, pin_memory=device.type == "cuda")
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    for x, labels in loader:
        x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
        s, t = s.float(), t.float()
        kd = F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.log_softmax(t / TEMPERATURE, 1), reduction="batchmean",
                      log_target=True) * TEMPERATURE ** 2
        loss = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def with_distill(teacher: nn.Module, student: nn.Module, data: TensorDataset, device: torch.device,
                 precision: str) -> None:
    convify.distill(teacher, student, data, epochs=1, batch_size=BATCH, lr=LR, temperature=TEMPERATURE,
                    alpha=ALPHA, val_data=None, device=device, progress=False, precision=precision)


def timed(run, teacher: nn.Module, start: nn.Module, data: TensorDataset, device: torch.device,
          precision: str) -> float:
    """Images per second of one epoch of ``run``, from a fresh copy of the student."""
    student = copy.deepcopy(start)
    torch.manual_seed(1)  # the same shuffle on both sides
    began = time.perf_counter()
    run(teacher, student, data, device, precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(data) / (time.perf_counter() - began)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating (default: 5)")
    parser.add_argument("--images", type=int, default=8192, help="images per epoch (default: 8192)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher, student = models()
    data = dataset(args.images)
    load_before = uptime()
    print(f"before: {load_before}", flush=True)
    warm = TensorDataset(*data[:4 * BATCH])  # first calls pay for allocator growth and kernel selection
    for run in (with_distill, hand_written):
        timed(run, teacher, student, warm, device, args.precision)
    sides = {"distill": with_distill, "hand-written": hand_written}
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    began = time.perf_counter()
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            speeds[name].append(timed(sides[name], teacher, student, data, device, args.precision))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {speeds[n][-1]:,.0f} img/s" for n in sides), flush=True)
    load_after = uptime()
    print(f"after: {load_after}", flush=True)
    d, h = statistics.median(speeds["distill"]), statistics.median(speeds["hand-written"])
    pairs = statistics.median(a / b for a, b in zip(speeds["distill"], speeds["hand-written"]))
    verdict = "met" if d / h >= TARGET else "missed"
    table = "\n".join([
        "| device | precision | threads | repeats | distill img/s (median) | hand-written img/s (median) | "
        "ratio of medians | median of paired ratios | target 90% |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {device} | {args.precision} | {args.threads} | {args.repeats} | {d:,.0f} | {h:,.0f} | {d / h:.1%} | "
        f"{pairs:.1%} | **{verdict}** |",
    ])
    runs = "; ".join(f"{n}: " + ", ".join(f"{v:,.0f}" for v in speeds[n]) for n in sides)
    print(table)
    print(f"all runs (img/s): {runs}")
    if args.write:
        from results import write_section  # noqa: PLC0415  (benchmarks/results.py, beside this script)

        cpu = platform.processor() or platform.machine()
        write_section("distill_speed", f"""## convify.distill against a hand-written loop (`benchmarks/distill_speed.py`)

`python benchmarks/distill_speed.py --device {args.device} --precision {args.precision} --threads {args.threads} \
--repeats {args.repeats} --write` on {cpu}, torch {torch.__version__}, {time.perf_counter() - began:.0f} s.
One epoch of {args.images:,} random 28x28 images (TensorDataset with labels, batch {BATCH}, shuffled), teacher
Model C (`model_c(16, in_channels=1, batch_norm=True, hidden_1x1=False)`), student its `replace_maxpool` rewrite,
Adam lr {LR}, KL at T={TEMPERATURE:g} with alpha={ALPHA} plus cross-entropy. distill runs without validation or
progress bar but with its cosine schedule, its metrics and its checks; the hand-written loop has none of them. The
two alternate in one process, each run from the same student weights and shuffle.

Machine load (`uptime`, {os.cpu_count()} logical CPUs): before `{load_before}`; after `{load_after}`. Absolute
speeds follow the load (other processes share the cores); the ratio, from alternating runs, is what the target is on.

{table}

All runs (img/s, in order): {runs}.

No GPU was lent to the session that wrote this section, so no GPU rows are measured (fp32 against bf16 on CUDA
is `--device cuda --precision fp32` and `--precision bf16`).""")


if __name__ == "__main__":
    main()
