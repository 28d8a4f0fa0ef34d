"""The pooling study of "Striving for Simplicity" (Springenberg et al., 2014) in miniature, on Fashion-MNIST.

Four models, same data (by default all 60,000 training images), same recipe,
each trained until its test accuracy stops moving:

* **Model C**: conv, conv, max pooling, twice, then a 1x1 convolution to the
  ten classes and global average pooling (BatchNorm after every convolution,
  which the paper does not have);
* **Strided-CNN-C**: ``convify.replace_maxpool(model_c, x, mode="fold")``, the
  poolings dropped and their stride moved onto the convolution before them;
* **All-CNN-C**: ``convify.replace_maxpool(model_c, x, mode="conv")``, each
  pooling a learnable 3x3 stride-2 convolution;
* **Model C -> all-conv, exact**: the *trained* Model C rewritten with
  ``convify.replace_maxpool(model_c, x, mode="exact")``: each max pooling
  becomes convolutions and ReLUs that compute it exactly, with no data and no
  training; its error is Model C's (the row also gives its top-1 agreement
  with Model C and the largest relative logit error on the test set);
* **Model C -> All-CNN-C, reconstructed + distilled**: the *trained* Model C
  rewritten with ``replace_maxpool(model_c, x, init="fit", calibration=...)``
  (each new convolution fitted by least squares on 1,024 unlabeled training
  images, in batches of 64), then ``convify.reconstruct`` on the same images,
  then one epoch of ``convify.distill`` toward the original. Its training
  budget is counted as Model C's epochs plus the distillation epochs.

The first three are trained from scratch, at width 32, with the recipe of
``benchmarks/originals.py``: Adam at lr 2e-3, batch 256, the learning rate
decayed per step along a cosine to zero over 15 epochs; the test accuracy is
measured after every epoch. Writes ``all_cnn_fashion_mnist.md`` (test accuracy,
the gain over the last 3 epochs as evidence of the plateau, parameters,
multiply-accumulates per image, training time; and the test errors beside
Table 3 of the paper, CIFAR-10) and ``all_cnn_fashion_mnist.png`` (test
accuracy after every epoch; the errors beside the paper's).

Run::

    sudo apt-get install dataset-fashion-mnist   # the IDX files, once
    python examples/all_cnn_fashion_mnist.py            # the converged study: about 1.5 hours on 2 CPU cores
    python examples/all_cnn_fashion_mnist.py --quick    # seconds, synthetic stand-in
    python examples/all_cnn_fashion_mnist.py --width 8 --epochs 3 --train-size 20000   # minutes, not converged

Time: at width 32 one epoch on 60,000 images takes about 2 CPU minutes for
Model C and All-CNN-C and 1 for Strided-CNN-C, so 15 epochs of the three
come to about 75 minutes; the fit, the reconstruction, one distillation epoch
and the test passes add about 10. The trained Model C is cached under
``~/.cache/convify/examples/``, in a file named by its settings, so a rerun
with the same settings reads it back instead of training it again (about 30
minutes less); ``--no-cache`` retrains it.
"""
from __future__ import annotations

import argparse
import copy
import math
import pickle
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import convify  # noqa: E402
from convify.zoo import count_macs, model_c  # noqa: E402

import _data  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "convify" / "examples"
#: Calibration images for the fit and the reconstruction are cut into batches of this size.
CALIBRATION_BATCH = 64

MODEL_C, STRIDED, ALLCONV = "Model C (max pooling)", "Strided-CNN-C (fold)", "All-CNN-C (conv)"
RECOVERED = "Model C -> All-CNN-C, reconstructed + distilled"
EXACT = "Model C -> all-conv, exact (mode=exact)"
#: Springenberg et al. (2014), Table 3: CIFAR-10 test error (%) without data augmentation.
PAPER_ERROR = {"Model C": 9.74, "Strided-CNN-C": 10.19, "ConvPool-CNN-C": 9.31, "All-CNN-C": 9.08}
#: The paper's name of each model trained here (ConvPool-CNN-C, its control for the extra parameters, is not).
PAPER_NAME = {MODEL_C: "Model C", STRIDED: "Strided-CNN-C", ALLCONV: "All-CNN-C"}


@dataclass
class Result:
    """One model's row: its test accuracy at each point of its curve, and what its training cost."""

    name: str
    epochs: list[int]  # the x of each point: training epochs spent so far (the rewrite: Model C's + distillation's)
    accuracy: list[float]
    parameters: int
    macs: int
    seconds: float
    budget: str
    how: str
    plateau: float | None = None  # points gained over the last 3 epochs, from scratch only

    @property
    def error(self) -> float:
        """Test error in percent, rounded as the tables show it."""
        return round(100 * (1 - self.accuracy[-1]), 2)


def epoch_count(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plateau(curve: list[float]) -> float | None:
    """Points gained over the last 3 epochs: best of the last 3 minus best before (None under 4 epochs)."""
    if len(curve) < 4:
        return None
    return 100 * (max(curve[-3:]) - max(curve[:-3]))


def train(model: nn.Module, data: _data.Data, epochs: int, lr: float, batch_size: int) -> tuple[list[float], float]:
    """Adam with a per-step cosine decay to zero over ``epochs``; returns the test accuracy after every epoch and the
    CPU seconds spent training (process time: on a shared machine wall time mostly measures the neighbours)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(data.train.labels) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    curve, seconds = [], 0.0
    for epoch in range(epochs):
        began = time.process_time()
        loss = _data.train_epoch(model, data.train, optimizer, batch_size, seed=epoch, scheduler=schedule)
        seconds += time.process_time() - began
        curve.append(_data.accuracy(model, data.test))
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss:.3f}, test accuracy {curve[-1]:.4f} ({seconds:.0f} s)",
              flush=True)
    return curve, seconds


def cache_file(args: argparse.Namespace, train_size: int) -> Path | None:
    """Where the trained Model C of these settings is kept; None for --quick and --no-cache.

    The name holds every setting its training depends on; ``model_c-bn`` stands for the architecture built in
    :func:`main` (BatchNorm, no conv bias, no hidden 1x1): give it another tag if that changes.
    """
    if args.quick or args.no_cache:
        return None
    return CACHE / (f"fashion_mnist-model_c-bn-w{args.width}-e{args.epochs}-b{args.batch_size}-lr{args.lr:g}"
                    f"-n{train_size}-seed{args.seed}.pt")


def train_model_c(model: nn.Module, data: _data.Data, args: argparse.Namespace
                  ) -> tuple[list[float], float, tuple[Path, int | None] | None]:
    """Model C trained by :func:`train`, or read back from the cache; the path it was read from, if it was,
    and the CPU threads it was trained with there (None where the cache does not say)."""
    path = cache_file(args, len(data.train.labels))
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["state"])
        except (RuntimeError, KeyError, OSError, pickle.UnpicklingError) as e:
            print(f"{path}: unreadable ({e}); training Model C again")
        else:
            print(f"{MODEL_C}: read from {path} (trained earlier with the same settings)")
            return list(saved["curve"]), float(saved["seconds"]), (path, saved.get("threads"))
    print(f"{MODEL_C}: training {args.epochs} epochs from scratch")
    curve, seconds = train(model, data, args.epochs, args.lr, args.batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "curve": curve, "seconds": seconds,
                    "threads": torch.get_num_threads(), "torch": str(torch.__version__)}, path)
        print(f"  cached in {path}")
    return curve, seconds, None


def calibration(images: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` training images drawn at random, in batches of :data:`CALIBRATION_BATCH` (their labels unused)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(10_000 + seed))
    return list(images[order[:count]].split(CALIBRATION_BATCH))


def recover(teacher: nn.Module, x: torch.Tensor, data: _data.Data, args: argparse.Namespace, teacher_epochs: int,
            teacher_seconds: float) -> Result:
    """The trained Model C rewritten to All-CNN-C: fit, reconstruct and distill, each step's accuracy printed."""
    batches = calibration(data.train.images, min(args.calibration, len(data.train.labels)), args.seed)
    images = sum(len(b) for b in batches)
    began = time.process_time()
    student = convify.replace_maxpool(teacher, x, mode="conv", init="fit", calibration=batches)
    fit_seconds = time.process_time() - began
    fitted = _data.accuracy(student, data.test)
    print(f"{RECOVERED}: init=fit on {images} unlabeled images: test accuracy {fitted:.4f}")
    began = time.process_time()
    convify.reconstruct(teacher, student, batches, steps=args.reconstruct_steps, progress=False)
    fit_seconds += time.process_time() - began
    reconstructed = _data.accuracy(student, data.test)
    print(convify.report(student))
    print(f"  reconstructed: test accuracy {reconstructed:.4f} ({fit_seconds:.0f} s with the fit)")

    torch.manual_seed(args.seed)
    loader = DataLoader(TensorDataset(*data.train), batch_size=args.batch_size, shuffle=True)
    began = time.process_time()
    history = convify.distill(teacher, student, loader, epochs=args.distill_epochs,
                              val_data=DataLoader(TensorDataset(*data.test), batch_size=1000),
                              device="cpu", progress=False)
    distill_seconds = time.process_time() - began
    print(history)
    return Result(
        RECOVERED, list(range(teacher_epochs, teacher_epochs + history.epochs + 1)),
        [reconstructed] + [float(a) for a in history.val_accuracy], parameters(student), count_macs(student, x),
        teacher_seconds + fit_seconds + distill_seconds, f"{teacher_epochs} + {args.distill_epochs}",
        f"Model C's training ({teacher_seconds:.0f} s), rewritten: init=fit on {images:,} unlabeled images "
        f"({fitted:.2%}), + `reconstruct` ({reconstructed:.2%}; {fit_seconds:.0f} s with the fit), "
        f"+ {epoch_count(args.distill_epochs)} of `distill` ({distill_seconds:.0f} s)\\*")


def plot(results: list[Result], path: Path, title: str, source: str) -> None:
    """Left: test accuracy after every epoch, on a range that shows the differences; right: the errors beside
    the paper's."""
    styles = [("black", "-", "o"), ("0.45", "--", "s"), ("0.25", ":", "^"), ("tab:blue", "none", "*"),
              ("tab:red", "-.", "D")]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    for r, (colour, line, marker) in zip(results, styles):
        ax.plot(r.epochs, [100 * a for a in r.accuracy], color=colour, linestyle=line, marker=marker, markersize=4,
                label=r.name)
    values = [100 * a for r in results for a in r.accuracy]
    ax.set_ylim(max(0.0, 5 * math.floor((min(values) - 1) / 5)), min(100.0, 5 * math.ceil((max(values) + 1) / 5)))
    ax.set_xlabel("training epochs (the rewrite: Model C's + distillation's)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, color="0.9")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="lower right")

    short = {EXACT: "Model C ->\nexact", RECOVERED: "Model C ->\nrecovered"}  # two lines a row: the legend says more
    ours = {PAPER_NAME.get(r.name) or short[r.name]: r.error for r in results}
    names = list(PAPER_ERROR) + [n for n in ours if n not in PAPER_ERROR]
    ys = range(len(names))
    for offset, label, colour, errors in ((-0.2, "paper: CIFAR-10 (Table 3)", "0.75", PAPER_ERROR),
                                          (0.2, f"here: {source}", "0.25", ours)):
        found = [(y, errors[n]) for y, n in zip(ys, names) if n in errors]
        drawn = bars.barh([y + offset for y, _ in found], [e for _, e in found], height=0.4, color=colour,
                          label=label)
        bars.bar_label(drawn, fmt="%.2f", fontsize=7, padding=2)
        for y, n in ((y, n) for y, n in zip(ys, names) if n not in errors):
            bars.text(0.02, y + offset, "not trained here" if n in PAPER_ERROR else "not in the paper",
                      transform=bars.get_yaxis_transform(), fontsize=7, color="0.4", va="center")
    bars.set_yticks(list(ys), names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("test error (%)")
    bars.set_xlim(0, 1.2 * max([*PAPER_ERROR.values(), *ours.values()]))
    bars.set_title("test error, beside the paper", fontsize=9)
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def versus(diff: float, paper_diff: float) -> str:
    """``diff`` points of error against Model C, and whether the paper's difference goes the same way."""
    if abs(diff) < 0.005:
        return "the same error as Model C, where the paper has a difference"
    way = "as in the paper" if (diff < 0) == (paper_diff < 0) else "the opposite of the paper"
    return f"{abs(diff):.2f} points {'less' if diff < 0 else 'more'} error than Model C, {way}"


def verdict(by_name: dict[str, Result], distill_epochs: int) -> str:
    """The paragraph under the paper's table: which way each comparison fell, stated from the numbers."""
    c, s, a, r, e = (by_name[n].error for n in (MODEL_C, STRIDED, ALLCONV, RECOVERED, EXACT))
    paper = PAPER_ERROR
    order = sorted(((a, "All-CNN-C"), (c, "Model C"), (s, "Strided-CNN-C")))
    ranking = order[0][1] + "".join(f" {'=' if e == before else '<'} {n}"
                                    for (before, _), (e, n) in zip(order, order[1:]))
    paper_order = a < c < s
    return (f"In the paper All-CNN-C has {paper['Model C'] - paper['All-CNN-C']:.2f} points less error than Model C "
            f"and Strided-CNN-C {paper['Strided-CNN-C'] - paper['Model C']:.2f} points more. Here All-CNN-C has "
            f"{versus(a - c, paper['All-CNN-C'] - paper['Model C'])}, and Strided-CNN-C has "
            f"{versus(s - c, paper['Strided-CNN-C'] - paper['Model C'])}: the paper's order (All-CNN-C < Model C < "
            f"Strided-CNN-C) {'holds' if paper_order else 'does not hold'} here "
            f"({ranking}). Rewritten with `mode=\"exact\"`, the trained Model C is all-convolutional at "
            f"{e:.2f}% error, {'the same as' if e == c else f'{e - c:+.2f} points against'} Model C, with no data "
            "and no training. Rewriting the trained Model C to the paper's learnable pooling instead (fit and "
            "reconstruction on "
            f"unlabeled images, then {epoch_count(distill_epochs)} of distillation) ends at {r:.2f}% error: "
            f"{r - c:+.2f} points of error against Model C and {r - a:+.2f} against All-CNN-C trained from scratch. "
            "One seed each, on another dataset than the paper's: a difference of a few tenths of a point is within "
            "what another seed may move (benchmarks/RESULTS.md, recovery, gives the spread over seeds).")


def write_table(results: list[Result], path: Path, header: str, data: _data.Data, distill_epochs: int) -> str:
    by_name = {r.name: r for r in results}
    lines = [header, "",
             "| model | test accuracy | last 3 epochs gained (points) | parameters | multiply-accumulates / image "
             "| training epochs | training CPU time (s) | training |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        gained = "-" if r.plateau is None else f"{r.plateau:+.2f}"
        lines.append(f"| {r.name} | {r.accuracy[-1]:.2%} | {gained} | {r.parameters:,} | {r.macs:,} | {r.budget} "
                     f"| {r.seconds:.0f} | {r.how} |")
    lines += ["",
              "CPU time is process time (user + system) of the training loop; the test passes between epochs are "
              "not counted, except in distillation\\*, which also runs the teacher at every step and measures the "
              "test set after each epoch. The rewrite's time includes Model C's.",
              "",
              "## Beside the paper",
              "",
              "Springenberg et al. (2014), Table 3: test error on CIFAR-10 without data augmentation, full-size models "
              "without BatchNorm. Here: test error (100 - accuracy) on the "
              f"{len(data.test.labels):,} {data.source} test images, models above. The difference columns are points "
              "of error against Model C.",
              "",
              f"| model | paper: CIFAR-10 error | here: {data.source} error | paper: vs Model C | here: vs Model C |",
              "|---|---:|---:|---:|---:|"]
    c = by_name[MODEL_C].error
    ours = {PAPER_NAME[n]: by_name[n].error for n in PAPER_NAME}
    for name, paper in PAPER_ERROR.items():
        here = f"{ours[name]:.2f}%" if name in ours else "not trained here"
        paper_diff = "" if name == "Model C" else f"{paper - PAPER_ERROR['Model C']:+.2f}"
        here_diff = f"{ours[name] - c:+.2f}" if name in ours and name != "Model C" else ""
        lines.append(f"| {name} | {paper:.2f}% | {here} | {paper_diff} | {here_diff} |")
    e, r = by_name[EXACT].error, by_name[RECOVERED].error
    lines += [f"| {EXACT} | not in the paper | {e:.2f}% |  | {e - c:+.2f} |",
              f"| {RECOVERED} | not in the paper | {r:.2f}% |  | {r - c:+.2f} |", "",
              verdict(by_name, distill_epochs)]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def command(argv: list[str]) -> str:
    """The command line that made this run, without ``--out`` (where it wrote is nobody's business)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--out" or arg.startswith("--out="):
            skip = arg == "--out"
            continue
        kept.append(arg)
    return shlex.join(["python", "examples/all_cnn_fashion_mnist.py", *kept])


def exact_rewrite(model: nn.Module, x: torch.Tensor, data: _data.Data, teacher: Result) -> Result:
    """The trained Model C rewritten with ``mode="exact"``: no data, no training; its accuracy measured."""
    began = time.process_time()
    exact = convify.replace_maxpool(model, x, mode="exact")
    seconds = time.process_time() - began
    print(convify.report(exact))
    accuracy = _data.accuracy(exact, data.test)
    with torch.no_grad():
        want = torch.cat([model(b) for b in data.test.images.split(1000)])
        got = torch.cat([exact(b) for b in data.test.images.split(1000)])
    agreement = float((want.argmax(1) == got.argmax(1)).float().mean())
    error = float((got - want).abs().max() / want.abs().max())
    print(f"{EXACT}: test accuracy {accuracy:.4f}, top-1 agreement with Model C {agreement:.2%}, "
          f"relative logit error {error:.1e}")
    return Result(EXACT, [teacher.epochs[-1]], [accuracy], parameters(exact), count_macs(exact, x),
                  teacher.seconds + seconds, f"{teacher.budget} + 0",
                  f"Model C's training ({teacher.seconds:.0f} s), rewritten with `mode=\"exact\"` in {seconds:.2f} s, "
                  f"no data: top-1 agreement with Model C {agreement:.2%}, relative logit error {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run on the synthetic stand-in (seconds)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the .md and .png (default: examples/)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs from scratch per model (default: 15)")
    parser.add_argument("--distill-epochs", type=int, default=1, help="epochs of distillation (default: 1)")
    parser.add_argument("--train-size", type=int, default=60000,
                        help="training images used, of 60000 (default: all; the test set is always complete)")
    parser.add_argument("--batch-size", type=int, default=256, help="default: 256")
    parser.add_argument("--width", type=int, default=32, help="channels of the first block (default: 32)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="Adam's peak learning rate from scratch, decayed per step along a cosine (default: 2e-3)")
    parser.add_argument("--calibration", type=int, default=1024,
                        help="unlabeled training images for the fit and the reconstruction (default: 1024)")
    parser.add_argument("--reconstruct-steps", type=int, default=None,
                        help="Adam steps per site of convify.reconstruct (default: convify's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true",
                        help="train Model C even when ~/.cache/convify/examples/ holds it for these settings")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (default: 2; on a busy machine 1 is often faster)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.distill_epochs, args.width, args.batch_size = 2, 1, 8, 32
        args.calibration, args.reconstruct_steps = 256, 50
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    data = _data.load(args.quick)
    data = data._replace(train=_data.Split(*(t[:args.train_size] for t in data.train)))
    print(f"{data.source}: {len(data.train.labels)} training, {len(data.test.labels)} test images")
    x = data.train.images[:1]

    base = model_c(args.width, in_channels=1, batch_norm=True, hidden_1x1=False)
    variants = {
        MODEL_C: base,
        STRIDED: convify.replace_maxpool(copy.deepcopy(base), x, mode="fold", init="kaiming"),
        ALLCONV: convify.replace_maxpool(copy.deepcopy(base), x, mode="conv", init="kaiming"),
    }
    print(convify.report(variants[ALLCONV]))
    results, cached = [], None
    for name, model in variants.items():
        if name == MODEL_C:
            curve, seconds, cached = train_model_c(model, data, args)
        else:
            print(f"{name}: training {args.epochs} epochs from scratch")
            curve, seconds = train(model, data, args.epochs, args.lr, args.batch_size)
        results.append(Result(name, list(range(1, len(curve) + 1)), curve, parameters(model), count_macs(model, x),
                               seconds, str(args.epochs), "from scratch", plateau(curve)))
    results.append(exact_rewrite(variants[MODEL_C].eval(), x, data, results[0]))
    results.append(recover(variants[MODEL_C].eval(), x, data, args, args.epochs, results[0].seconds))

    stem = args.out / "all_cnn_fashion_mnist"
    title = f"{data.source}, {len(data.train.labels):,} training images, width {args.width}"
    plot(results, stem.with_suffix(".png"), title, data.source)
    header = (f"# The pooling study in miniature\n\n{title}, {torch.get_num_threads()} CPU thread(s), "
              f"seed {args.seed}. "
              f"From scratch: Adam at lr {args.lr:g}, decayed per step along a cosine to zero over {args.epochs} "
              f"epochs, batch {args.batch_size}; test accuracy after the last epoch. "
              f"`{command(sys.argv[1:])}`.")
    if cached is not None:
        path, threads = cached
        with_threads = f" and {threads} CPU thread(s)" if threads not in (None, torch.get_num_threads()) else ""
        header += (f" Model C was read from the cache ({path.name}): its accuracies and time are those "
                   f"measured when this script trained it with the same settings{with_threads}.")
    table = write_table(results, stem.with_suffix(".md"), header, data, args.distill_epochs)
    print(table)
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
