"""How close can the rewritten architecture get to the original at all? A control for benchmarks/recovery.py.

The recovery targets ask a model whose max poolings became strided
convolutions to come within 0.1 point of the original's test accuracy after
one epoch of distillation. That presumes the rewritten architecture can reach
the original's accuracy at all. Two measurements per architecture and seed,
with the originals and the recipe of ``benchmarks/originals.py``:

* **from scratch**: the rewritten architecture (``replace_maxpool(mode="conv",
  init="kaiming")`` of a fresh original: All-CNN-C for Model C) trained with
  exactly the original's recipe and budget (cached like the originals);
* **a longer schedule** (the stopping check): the original itself trained
  with the same recipe over twice the epochs (last seed only by default);
  if that does not beat the original, the original had converged and the
  gap is the rewrite's;
* **more distillation**: the converged original rewritten with
  ``init="fit"`` on 1,024 unlabeled images, ``convify.reconstruct`` on them,
  then ``convify.distill`` for 1, 2 and 3 epochs (each a run of its own, its
  cosine schedule spanning its epochs);
* **how faithful a copy can get** (top-1 agreement with the original on the
  test images): originals of different seeds against each other (two
  trainings of the same recipe), the rewritten architecture from scratch
  against its seed's original, and a *fidelity ceiling* on the first seed:
  the reconstructed model distilled for ``--ceiling-epochs`` epochs on all
  60,000 training images without labels (pure imitation, convify's KL loss),
  its test agreement after every epoch. The recovery targets ask 98%
  agreement from 1,024 images in 2 minutes; the ceiling says what 60,000
  images and many epochs give.

``--write`` replaces this benchmark's section of ``benchmarks/RESULTS.md``.

    python benchmarks/recovery_capacity.py --write
    python benchmarks/recovery_capacity.py --arch model_c --seeds 1 --distill-epochs 1 --ceiling-epochs 0   # quicker
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import convify

sys.path.insert(0, str(Path(__file__).parent))
from originals import ALLCONV, ARCHS, BATCH, EPOCHS, LR, WIDTH, cached, load_data, predict  # noqa: E402
from recovery import CALIBRATION, calibration, measure  # noqa: E402


@dataclass
class SeedRun:
    arch: str
    seed: int
    original: float
    scratch: float  # the rewritten architecture trained from scratch: final test accuracy
    scratch_plateau: float
    scratch_agreement: float  # the rewritten architecture from scratch against this seed's original
    longer: float | None = None  # the original's recipe over twice the epochs: final test accuracy
    distilled: dict[int, float] = field(default_factory=dict)  # epochs of distillation -> test accuracy
    distilled_agreement: dict[int, float] = field(default_factory=dict)  # epochs of distillation -> agreement
    ceiling: list[tuple[float, float]] = field(default_factory=list)  # per epoch: (agreement, accuracy)


def run_seed(arch: str, seed: int, data: tuple, distill_epochs: list[int], longer: bool, ceiling_epochs: int,
             log) -> SeedRun:
    train_x, train_y, test_x, test_y = data
    original = cached(arch, seed, data, log=log).model.eval()
    scratch = cached(arch + ALLCONV, seed, data, log=log)
    reference = predict(original, test_x)
    run = SeedRun(arch, seed, float((reference == test_y).float().mean()), scratch.test_accuracy[-1],
                  scratch.plateau, measure(scratch.model, reference, test_x, test_y, 0.0).agreement)
    if longer:
        run.longer = cached(arch, seed, data, epochs=2 * EPOCHS, log=log).test_accuracy[-1]
        log(f"{arch} seed {seed}: the original's recipe over {2 * EPOCHS} epochs {100 * run.longer:.2f}%")
    log(f"{arch} seed {seed}: original {100 * run.original:.2f}%, rewritten architecture from scratch "
        f"{100 * run.scratch:.2f}% (last 3 epochs gained {run.scratch_plateau:+.2f})")
    cal = calibration(train_x, CALIBRATION, seed)
    example = train_x[:1]
    reconstructed = convify.replace_maxpool(original, example, init="fit", calibration=cal)
    convify.reconstruct(original, reconstructed, cal, progress=False)
    start = {k: v.clone() for k, v in reconstructed.state_dict().items()}
    for epochs in distill_epochs:
        reconstructed.load_state_dict(start)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        convify.distill(original, reconstructed, TensorDataset(train_x, train_y), epochs=epochs, batch_size=BATCH,
                        device="cpu", progress=False)
        m = measure(reconstructed.eval(), reference, test_x, test_y, 0.0)  # one pass: accuracy and agreement
        run.distilled[epochs], run.distilled_agreement[epochs] = m.accuracy, m.agreement
        log(f"{arch} seed {seed}: reconstruct + {epochs} epoch(s) of distill {100 * run.distilled[epochs]:.2f}% "
            f"(agreement {100 * run.distilled_agreement[epochs]:.2f}%, {time.perf_counter() - t0:.0f} s)")
    if ceiling_epochs:
        reconstructed.load_state_dict(start)
        torch.manual_seed(seed)
        history = convify.distill(original, reconstructed, TensorDataset(train_x), epochs=ceiling_epochs,
                                  batch_size=BATCH, device="cpu", progress=False,
                                  val_data=TensorDataset(test_x, test_y))
        run.ceiling = list(zip(history.val_agreement, history.val_accuracy))
        log(f"{arch} seed {seed}: fidelity ceiling, agreement per epoch "
            + ", ".join(f"{100 * a:.2f}%" for a, _ in run.ceiling))
    return run


def twin_agreements(arch: str, seeds: int, data: tuple, log) -> list[float]:
    """Top-1 agreement on the test images of every pair of ``arch``'s originals (seeds 0 .. seeds-1)."""
    test_x = data[2]
    predictions = [predict(cached(arch, seed, data, log=log).model, test_x) for seed in range(seeds)]
    return [float((a == b).float().mean()) for i, a in enumerate(predictions) for b in predictions[i + 1:]]


def render(args: argparse.Namespace, runs: list[SeedRun], twins: dict[str, list[float]], total: float) -> str:
    lines = [
        "# Recovery: how close the rewritten architecture gets at all (control)",
        "",
        f"`python benchmarks/recovery_capacity.py --seeds {args.seeds} --arch {' '.join(args.arch)} "
        f"--distill-epochs {' '.join(map(str, args.distill_epochs))} --ceiling-epochs {args.ceiling_epochs} "
        f"--threads {args.threads}` on "
        f"{platform.machine()} CPU, torch {torch.__version__}; {total / 60:.0f} min (wall, under the load of "
        "other work on the 2 cores). The originals of the recovery "
        f"benchmark (width {WIDTH}, Adam lr {LR:g}, cosine to zero over "
        f"{EPOCHS} epochs, batch {BATCH}, all 60,000 "
        "training images). *From scratch*: the rewritten architecture (each max pooling a strided convolution, "
        "`replace_maxpool(mode=\"conv\", init=\"kaiming\")`; for Model C that is All-CNN-C) trained with the same "
        f"recipe and budget, cached beside the originals. *Reconstruct + distill*: `init=\"fit\"` and "
        f"`convify.reconstruct` on {CALIBRATION} unlabeled images, then `convify.distill` (defaults, batch "
        f"{BATCH}) for the given epochs, each its own run. Test accuracy on the 10,000 test images, minus the "
        "original's, mean over the seeds and worst seed.",
        "",
        "| architecture | original (mean) | original's recipe over twice the epochs: minus original (seeds) | "
        "rewritten, from scratch: minus original (mean / worst) | "
        + " | ".join(f"reconstruct + {e} epoch{'s' if e > 1 else ''} of distill (mean / worst)"
                     for e in args.distill_epochs) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(args.distill_epochs),
    ]
    for arch in dict.fromkeys(r.arch for r in runs):
        rs = [r for r in runs if r.arch == arch]

        def cell(values: list[float]) -> str:
            return f"{statistics.mean(values):+.2f} / {min(values):+.2f}"

        scratch = [100 * (r.scratch - r.original) for r in rs]
        longer = ", ".join(f"{100 * (r.longer - r.original):+.2f} (seed {r.seed})" for r in rs if r.longer is not None)
        lines.append(f"| {arch} | {100 * statistics.mean(r.original for r in rs):.2f}% | {longer or '-'} | "
                     f"{cell(scratch)} | "
                     + " | ".join(cell([100 * (r.distilled[e] - r.original) for r in rs])
                                  for e in args.distill_epochs) + " |")
    lines += ["", "Per seed (test accuracy): " + "; ".join(
        f"{r.arch} seed {r.seed}: original {100 * r.original:.2f}%, from scratch {100 * r.scratch:.2f}% (last 3 "
        f"epochs {r.scratch_plateau:+.2f}), "
        + (f"over {2 * EPOCHS} epochs {100 * r.longer:.2f}%, " if r.longer is not None else "")
        + ", ".join(f"{e} ep {100 * a:.2f}%" for e, a in r.distilled.items()) for r in runs) + "."]
    lines += ["", *fidelity(args, runs, twins)]
    return "\n".join(lines) + "\n"


def fidelity(args: argparse.Namespace, runs: list[SeedRun], twins: dict[str, list[float]]) -> list[str]:
    """Top-1 agreement with the original on the test images: what a copy of it reaches by each route."""
    ceiling = next((r.ceiling for r in runs if r.ceiling), None)
    lines = [
        "Fidelity: top-1 agreement with the original on the 10,000 test images (mean / worst). *Originals of "
        "different seeds*: every pair of this benchmark's originals (the same recipe trained twice). *Fidelity "
        f"ceiling* (first seed): the reconstructed model distilled on all 60,000 training images without labels "
        f"(pure imitation) for {args.ceiling_epochs} epochs, one cosine schedule; its best epoch.",
        "",
        "| architecture | originals of different seeds | rewritten, from scratch | "
        + " | ".join(f"reconstruct + {e} epoch{'s' if e > 1 else ''} of distill" for e in args.distill_epochs)
        + (f" | fidelity ceiling ({args.ceiling_epochs} epochs, first seed)" if ceiling is not None else "") + " |",
        "|---|---:|---:|" + "---:|" * (len(args.distill_epochs) + (ceiling is not None)),
    ]

    def cell(values: list[float]) -> str:
        return f"{100 * statistics.mean(values):.2f}% / {100 * min(values):.2f}%" if values else "-"

    for arch in dict.fromkeys(r.arch for r in runs):
        rs = [r for r in runs if r.arch == arch]
        row = [arch, cell(twins.get(arch, [])), cell([r.scratch_agreement for r in rs]),
               *(cell([r.distilled_agreement[e] for r in rs]) for e in args.distill_epochs)]
        if ceiling is not None:
            own = next((r.ceiling for r in rs if r.ceiling), None)
            if own:
                best = max(range(len(own)), key=lambda i: own[i][0])
                row.append(f"{100 * own[best][0]:.2f}% (epoch {best + 1}; accuracy {100 * own[best][1]:.2f}%)")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    for r in runs:
        if r.ceiling:
            lines += ["", f"Fidelity ceiling, {r.arch} seed {r.seed}, after each epoch (agreement / accuracy): "
                      + ", ".join(f"{100 * a:.2f}% / {100 * c:.2f}%" for a, c in r.ceiling) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--distill-epochs", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--longer-seeds", type=int, default=1,
                        help="the last seeds whose original is also trained over twice the epochs (default: 1)")
    parser.add_argument("--ceiling-epochs", type=int, default=8,
                        help="epochs of the fidelity ceiling on the first seed (0: not measured; default: 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = load_data()
    log = lambda s: print(s, flush=True)  # noqa: E731
    runs: list[SeedRun] = []
    twins = {arch: twin_agreements(arch, args.seeds, data, log) for arch in args.arch}
    planned = len(args.arch) * args.seeds
    for arch in args.arch:
        for seed in range(args.seeds):
            longer = seed >= args.seeds - args.longer_seeds
            runs.append(run_seed(arch, seed, data, args.distill_epochs, longer,
                                 args.ceiling_epochs if seed == 0 else 0, log))
            text = render(args, runs, twins, time.perf_counter() - started)
            if len(runs) < planned:
                text += f"\n_Partial: {len(runs)} of {planned} runs measured; the run went on (or was stopped)._\n"
            if args.write:  # after every run: a stopped run leaves what it measured
                from results import write_section  # noqa: PLC0415

                write_section("recovery-capacity", text)
    print(text)


if __name__ == "__main__":
    main()
