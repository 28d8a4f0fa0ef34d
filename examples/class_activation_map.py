"""Class activation maps for free: a GAP -> Linear head becomes a 1x1 convolution before the pooling.

A small CNN ending in global average pooling and a Linear layer is trained on
Fashion-MNIST. ``convify.replace_linear_head(model, x, mode="gap")`` moves the
Linear in front of the pooling as a 1x1 convolution (exact: averaging and an
affine map commute), and with ``dense=True`` the pooling goes too, so the model
outputs, per class, a 7x7 map of scores whose mean is that class's logit:
the class activation map (Zhou et al., 2016), with no hooks and no gradients.
Writes ``class_activation_map.png``: test images of different classes over
their CAM for the predicted class.

Run::

    python examples/class_activation_map.py           # Fashion-MNIST (dataset-fashion-mnist), about 1 CPU minute
    python examples/class_activation_map.py --quick   # seconds, synthetic stand-in
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import convify  # noqa: E402

import _data  # noqa: E402

HERE = Path(__file__).resolve().parent


def classifier() -> nn.Sequential:
    """2 x (conv, conv, max pooling), conv, then global average pooling -> Linear(64, 10)."""
    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*conv(1, 16), *conv(16, 16), nn.MaxPool2d(2), *conv(16, 32), *conv(32, 32),
                         nn.MaxPool2d(2), *conv(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def one_per_class(split: _data.Split, count: int) -> list[int]:
    """Indices of the first test image of each of ``count`` classes."""
    return [int((split.labels == k).nonzero()[0]) for k in range(count)]


def plot(images: torch.Tensor, labels: list[int], cams: torch.Tensor, predicted: list[int], path: Path,
         source: str) -> None:
    """Row 1: the images; row 2: the CAM of the predicted class, upsampled, with the item's outline."""
    n, size = len(labels), images.shape[-1]
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n + 1.2, 3.5), dpi=72, layout="constrained", squeeze=False)
    bound = float(cams.abs().max())
    for j in range(n):
        top, bottom = axes[0, j], axes[1, j]
        top.imshow(images[j, 0], cmap="gray", vmin=0, vmax=1)
        top.set_title(f"{_data.CLASSES[labels[j]]}", fontsize=8)
        shown = bottom.imshow(cams[j], cmap="magma", vmin=-bound, vmax=bound)
        bottom.contour(images[j, 0], levels=[0.1], colors="white", linewidths=0.8, linestyles="--")
        mark = "" if predicted[j] == labels[j] else " (wrong)"
        bottom.set_title(f"CAM: {_data.CLASSES[predicted[j]]}{mark}", fontsize=7)
        for ax in (top, bottom):
            ax.set_xticks([0, size - 1])
            ax.set_yticks([0, size - 1])
            ax.tick_params(labelsize=6)
    axes[1, 0].set_xlabel("x (pixels)", fontsize=7)
    axes[1, 0].set_ylabel("y (pixels)", fontsize=7)
    axes[0, 0].set_ylabel("y (pixels)", fontsize=7)
    bar = fig.colorbar(shown, ax=axes[1, :], fraction=0.05, pad=0.01)
    bar.set_label("score (logit units;\nmean = class logit)", fontsize=7)
    fig.suptitle(f"Class activation maps from convify.replace_linear_head(mode='gap', dense=True), {source}",
                 fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run on the synthetic stand-in (seconds)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the .png (default: examples/)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-size", type=int, default=15000, help="training images used (default: 15000)")
    parser.add_argument("--images", type=int, default=6, help="test images shown, one per class (default: 6)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (default: 2; on a busy machine 1 is often faster)")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    data = _data.load(args.quick)
    train = _data.Split(*(t[:args.train_size] for t in data.train))
    model = classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3 if args.quick else args.lr)
    began = time.perf_counter()
    for epoch in range(args.epochs):
        _data.train_epoch(model, train, optimizer, batch_size=32 if args.quick else 64, seed=epoch)
    model.eval()
    print(f"{data.source}: trained on {len(train.labels)} images for {args.epochs} epochs "
          f"({time.perf_counter() - began:.0f} s); test accuracy {_data.accuracy(model, data.test):.2%}")

    x = data.test.images[:1]
    gap = convify.replace_linear_head(model, x, mode="gap")
    cam_model = convify.replace_linear_head(model, x, mode="gap", dense=True)
    print(convify.report(cam_model))
    picks = one_per_class(data.test, args.images)
    images = data.test.images[picks]
    with torch.no_grad():
        logits = model(images)
        maps = cam_model(images)  # (n, 10, 7, 7): one score map per class
        head_error = float((gap(images) - logits).abs().max() / logits.abs().max())
        mean_error = float((maps.mean((2, 3)) - logits).abs().max() / logits.abs().max())
    print(f"mode='gap' output vs the original logits: relative error {head_error:.1e}")
    print(f"mean of each CAM vs the original logit: relative error {mean_error:.1e}")
    predicted = logits.argmax(1).tolist()
    cams = maps[torch.arange(len(picks)), logits.argmax(1)]
    cams = F.interpolate(cams[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    plot(images, [int(data.test.labels[i]) for i in picks], cams, predicted, args.out / "class_activation_map.png",
         data.source)
    print(f"wrote {args.out / 'class_activation_map.png'}")


if __name__ == "__main__":
    main()
