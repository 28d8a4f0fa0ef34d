"""Converged originals for benchmarks/recovery.py (imported by it; also runnable to fill the cache).

    python benchmarks/originals.py            # trains what the cache lacks, both architectures, seeds 0-2
    python benchmarks/originals.py --stopping-check --write   # and each over twice the epochs: did it converge?
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from convify.errors import DataError
from convify.zoo import fashion_mnist, model_c, resnet_mini

MEAN, STD = 0.2860, 0.3530
CACHE = Path.home() / ".cache" / "convify" / "recovery"
ARCHS = ("model_c", "resnet_mini")
#: Suffix of an architecture name for its all-convolutional rewrite (see :func:`build`).
ALLCONV = "-allconv"
#: The recipe every original is trained with (and that the cache file names). 15 epochs is where the test
#: accuracy stops improving: the same recipe over twice the epochs does not gain on the mean over the seeds (the
#: stopping check, ``originals.py --stopping-check``, in RESULTS.md).
EPOCHS, BATCH, LR, WIDTH = 15, 256, 2e-3, 16
#: The stopping check's threshold: a schedule twice as long gains less than this (points, mean over the seeds).
STOPPED = 0.1


def build(arch: str, width: int = WIDTH) -> nn.Module:
    """The original of ``arch``; ``"<arch>-allconv"`` is its max poolings rewritten to strided convolutions
    (``replace_maxpool(mode="conv")``, Kaiming init): the rewritten architecture, for training from scratch."""
    if arch.endswith(ALLCONV):
        import convify  # noqa: PLC0415

        original = build(arch[:-len(ALLCONV)], width)
        return convify.replace_maxpool(original, torch.zeros(1, 1, 28, 28), mode="conv", init="kaiming")
    if arch == "model_c":
        return model_c(width, in_channels=1, batch_norm=True, hidden_1x1=False)
    if arch == "resnet_mini":
        return resnet_mini(width)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's split, standardized with the training set's mean and std."""
    x, y = fashion_mnist(split)
    return x.sub_(MEAN).div_(STD), y


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's training and test images and labels, standardized; exits with the reason (the Debian
    package to install) when the data is missing."""
    try:
        return (*load_split("train"), *load_split("test"))
    except DataError as e:
        sys.exit(str(e))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    return float((predict(model, x, batch) == y).float().mean())


def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    model.train(was)
    return out


@dataclass
class Trained:
    arch: str
    seed: int
    model: nn.Module
    epochs: int
    test_accuracy: list[float] = field(default_factory=list)  # after each epoch
    seconds: float = 0.0

    @property
    def plateau(self) -> float:
        """Points gained over the last 3 epochs (the stopping evidence)."""
        acc = self.test_accuracy
        return 100 * (max(acc[-3:]) - max(acc[:-3])) if len(acc) > 3 else float("nan")


def train(arch: str, seed: int, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
          test_y: torch.Tensor, *, epochs: int = EPOCHS, batch: int = BATCH, lr: float = LR,
          log=print) -> Trained:
    """Adam with a per-step cosine decay to zero over ``epochs``: the test accuracy flattens by the end."""
    torch.manual_seed(seed)
    model = build(arch)
    g = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train_x) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    out = Trained(arch, seed, model, epochs)
    for epoch in range(epochs):
        began = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(train_x), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        out.seconds += time.perf_counter() - began
        out.test_accuracy.append(accuracy(model, test_x, test_y))
        log(f"{arch} seed {seed} epoch {epoch + 1}/{epochs}: test {100 * out.test_accuracy[-1]:.2f}% "
            f"({out.seconds:.0f} s)")
    model.eval()
    return out


def cached(arch: str, seed: int, data, *, epochs: int = EPOCHS, cache: Path | None = CACHE, log=print) -> Trained:
    """The trained original of ``arch`` and ``seed``, from the cache or trained now (and cached); ``epochs``: the
    length of the schedule (the recipe's by default)."""
    path = cache / f"{arch}-w{WIDTH}-e{epochs}-b{BATCH}-lr{LR:g}-s{seed}.pt" if cache is not None else None
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        model = build(arch)
        model.load_state_dict(saved["state"])
        return Trained(arch, seed, model.eval(), saved["epochs"], saved["test_accuracy"], saved["seconds"])
    out = train(arch, seed, *data, epochs=epochs, log=log)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": out.model.state_dict(), "epochs": out.epochs, "test_accuracy": out.test_accuracy,
                    "seconds": out.seconds}, path)
    return out


def stopping_check(archs: list[str], seeds: int, data, log=print) -> str:
    """Each original against the same recipe over twice the epochs (trained now unless cached): the markdown of
    RESULTS.md's ``originals`` section."""
    lines = [
        "# The recovery benchmark's originals: where the test accuracy stops improving",
        "",
        f"`python benchmarks/originals.py --seeds {seeds} --arch {' '.join(archs)} --stopping-check --write` on "
        f"{platform.machine()} CPU, torch {torch.__version__}. The recipe: width {WIDTH}, Adam lr {LR:g} with a "
        f"cosine decay to zero over {EPOCHS} epochs (stepped every batch), batch {BATCH}, all 60,000 training "
        "images, no augmentation; one original per seed (the seed sets the initial weights and the shuffling). "
        f"The stopping check trains each seed again with the same recipe over {2 * EPOCHS} epochs: where that "
        f"gains less than {STOPPED} point on the mean over the seeds (the recovery targets' finest step), the "
        "originals had stopped improving. Final test accuracy on "
        "the 10,000 test images; wall time of the training (under the load of other work on the 2 cores).",
        "",
        f"| architecture | seed | {EPOCHS} epochs (the original) | {2 * EPOCHS} epochs | gain (points) | "
        f"best epoch of the {EPOCHS} | training (min, {EPOCHS} / {2 * EPOCHS}) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for arch in archs:
        gains = []
        for seed in range(seeds):
            short, long = cached(arch, seed, data, log=log), cached(arch, seed, data, epochs=2 * EPOCHS, log=log)
            gain = 100 * (long.test_accuracy[-1] - short.test_accuracy[-1])
            gains.append(gain)
            best = max(range(len(short.test_accuracy)), key=short.test_accuracy.__getitem__)
            lines.append(f"| {arch} | {seed} | {100 * short.test_accuracy[-1]:.2f}% | "
                         f"{100 * long.test_accuracy[-1]:.2f}% | {gain:+.2f} | {best + 1} "
                         f"({100 * short.test_accuracy[best]:.2f}%) | {short.seconds / 60:.0f} / "
                         f"{long.seconds / 60:.0f} |")
        lines.append(f"| {arch} | mean | | | {statistics.mean(gains):+.2f} | | |")
        verdicts.append(f"- {arch}: stopped improving at {EPOCHS} epochs: "
                        f"{'**yes**' if statistics.mean(gains) < STOPPED else '**no**'} (mean gain "
                        f"{statistics.mean(gains):+.2f}, seeds {', '.join(f'{g:+.2f}' for g in gains)}).")
    return "\n".join([*lines, "", *verdicts]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stopping-check", action="store_true",
                        help=f"also train each seed over {2 * EPOCHS} epochs and compare (the evidence that the "
                             "originals stopped improving)")
    parser.add_argument("--write", action="store_true",
                        help="with --stopping-check: replace the originals section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data()
    log = lambda s: print(s, flush=True)  # noqa: E731
    for seed in range(args.seeds):
        for arch in args.arch:
            t = cached(arch, seed, data, log=log)
            print(f"{arch} seed {seed}: {100 * t.test_accuracy[-1]:.2f}% after {t.epochs} epochs, "
                  f"{t.seconds:.0f} s; last 3 epochs gained {t.plateau:+.2f} points", flush=True)
    if args.stopping_check:
        text = stopping_check(args.arch, args.seeds, data, log)
        print(text)
        if args.write:
            from results import write_section  # noqa: PLC0415

            write_section("originals", text)


if __name__ == "__main__":
    main()
