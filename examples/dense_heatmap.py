"""Dense score maps: a 28x28 classifier scores every 28x28 window of a large canvas in one pass.

A small CNN with a flatten -> Linear head is trained on Fashion-MNIST items;
``convify.replace_linear_head(model, x, mode="conv", dense=True)`` turns the
head into a 7x7 convolution and a 1x1 convolution (exact) and drops the
flatten, so a 112x112 canvas gives a 10 x 22 x 22 map of class scores, one
per 28x28 window at a stride of 4 pixels. Items pasted at known spots light up
their own class's map. Writes ``dense_heatmap.png`` (the canvas beside the ten
class maps) and prints how often the class with the highest score at each
item's spot is the item's class, over many canvases.

Large-canvas mode (``--large``, default 3072 pixels a side; 256 with
``--quick``): a canvas of a few thousand pixels a side strewn with items is
scanned in tiles with ``convify.dense_map``; the stitched map is compared with
the one pass and drawn with ``convify.dense.heatmap`` (each position in its top
class's colour) into ``dense_heatmap_large.png``.

Run::

    python examples/dense_heatmap.py           # Fashion-MNIST (dataset-fashion-mnist), about 1 CPU minute
    python examples/dense_heatmap.py --quick   # seconds, synthetic stand-in
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

import convify  # noqa: E402

import _data  # noqa: E402

HERE = Path(__file__).resolve().parent
STRIDE = 4  # two 2x2 max poolings: one map position per 4 canvas pixels
ITEM = 28


def classifier() -> nn.Sequential:
    """conv, pool, conv, pool, then a flatten -> Linear -> Linear head built for 28x28 inputs."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def spots(count: int, size: int, g: torch.Generator) -> list[tuple[int, int]]:
    """``count`` top-left corners on the map's 4-pixel grid whose 28x28 items do not overlap."""
    chosen: list[tuple[int, int]] = []
    while len(chosen) < count:
        y, x = (STRIDE * torch.randint(0, (size - ITEM) // STRIDE + 1, (2,), generator=g)).tolist()
        if all(abs(y - cy) >= ITEM or abs(x - cx) >= ITEM for cy, cx in chosen):
            chosen.append((y, x))
    return chosen


def canvases(split: _data.Split, n: int, items: int, size: int, seed: int
             ) -> tuple[torch.Tensor, list[list[tuple[int, int, int, int]]]]:
    """``n`` black canvases with ``items`` test images each; per canvas (y, x, label, index) of every item."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size)
    placed = []
    for c in range(n):
        picks = torch.randint(0, len(split.labels), (items,), generator=g).tolist()
        row = []
        for (y, x), i in zip(spots(items, size, g), picks):
            images[c, :, y:y + ITEM, x:x + ITEM] = split.images[i]
            row.append((y, x, int(split.labels[i]), i))
        placed.append(row)
    return images, placed


def plot(canvas: torch.Tensor, items: list[tuple[int, int, int, int]], scores: torch.Tensor, path: Path,
         source: str) -> None:
    """The canvas beside one probability map per class, the maps placed at their windows' centres."""
    probs = scores.softmax(0)
    size, (h, w) = canvas.shape[-1], probs.shape[-2:]
    # map position (i, j) scores the window whose top-left pixel is (4i, 4j); show it at the window's centre
    extent = (ITEM / 2 - STRIDE / 2, ITEM / 2 + STRIDE * (w - 0.5), ITEM / 2 + STRIDE * (h - 0.5), ITEM / 2 - STRIDE / 2)
    fig = plt.figure(figsize=(10, 3.9), dpi=72, layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 2.3])
    ax = left.subplots()
    ax.imshow(canvas[0], cmap="gray", vmin=0, vmax=1)
    for y, x, label, _ in items:
        ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), ITEM, ITEM, fill=False, edgecolor="white", linestyle="--"))
        ax.text(x + 1, y + 1, _data.CLASSES[label], color="black", fontsize=6, va="top",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_title(f"canvas {size}x{size} ({source})", fontsize=9)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    axes = right.subplots(2, 5, sharex=True, sharey=True)
    for k, ax in enumerate(axes.flat):
        image = ax.imshow(probs[k], cmap="viridis", vmin=0, vmax=1, extent=extent)
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
        centres = [(x + ITEM / 2, y + ITEM / 2) for y, x, label, _ in items if label == k]
        if centres:  # where the items of this class are
            ax.plot(*zip(*centres), marker="o", markersize=9, markerfacecolor="none", markeredgecolor="white",
                    markeredgewidth=1.2, linestyle="none")
        ax.set_title(_data.CLASSES[k], fontsize=8)
        ax.set_xticks([0, size // 2, size])
        ax.set_yticks([0, size // 2, size])
        ax.tick_params(labelsize=6)
    right.supxlabel("x (pixels), each score at its window's centre; o: an item of that class", fontsize=8)
    right.supylabel("y (pixels)", fontsize=8)
    bar = right.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
    bar.set_label("class probability (softmax of the 10 scores)", fontsize=7)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run on the synthetic stand-in (seconds)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the .png (default: examples/)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20000, help="training images used (default: 20000)")
    parser.add_argument("--canvas", type=int, default=112, help="canvas side in pixels (default: 112)")
    parser.add_argument("--items", type=int, default=5, help="items per canvas (default: 5)")
    parser.add_argument("--canvases", type=int, default=200, help="canvases scored (default: 200)")
    parser.add_argument("--large", type=int, default=3072, help="large canvas side in pixels (default: 3072)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (default: 2; on a busy machine 1 is often faster)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.canvases = 3, 20
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    data = _data.load(args.quick)
    train = _data.Split(*(t[:args.train_size] for t in data.train))
    model = classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    began = time.perf_counter()
    for epoch in range(args.epochs):
        _data.train_epoch(model, train, optimizer, batch_size=32 if args.quick else 64, seed=epoch)
    model.eval()
    print(f"{data.source}: trained on {len(train.labels)} images for {args.epochs} epochs "
          f"({time.perf_counter() - began:.0f} s); test accuracy on 28x28 items {_data.accuracy(model, data.test):.2%}")

    dense = convify.replace_linear_head(model, data.test.images[:1], mode="conv", dense=True)
    print(convify.report(dense))
    images, placed = canvases(data.test, args.canvases, args.items, args.canvas, seed=1)
    with torch.no_grad():
        began = time.perf_counter()
        maps = dense(images)  # one pass: (canvases, 10, H', W')
        seconds = time.perf_counter() - began
        hits = crop_hits = total = 0
        gap = 0.0
        for c, row in enumerate(placed):
            for y, x, label, index in row:
                spot = maps[c, :, y // STRIDE, x // STRIDE]
                alone = model(data.test.images[index:index + 1])[0]
                hits += int(spot.argmax()) == label
                crop_hits += int(alone.argmax()) == label
                gap = max(gap, float((spot - alone).abs().max()))
                total += 1
    print(f"dense pass: {args.canvases} canvases {args.canvas}x{args.canvas} -> maps {tuple(maps.shape[1:])} "
          f"in {seconds:.2f} s")
    print(f"top class at the item's spot is the item's class: {hits}/{total} = {hits / total:.1%} "
          f"(the classifier on the item alone: {crop_hits / total:.1%}; largest score difference "
          f"{gap:.3f}, from the neighbouring pixels the canvas has instead of zero padding)")
    plot(images[0], placed[0], maps[0], args.out / "dense_heatmap.png", data.source)
    print(f"wrote {args.out / 'dense_heatmap.png'}")
    large_canvas(dense, data.test, 256 if args.quick else args.large, args.out)


def large_canvas(dense: nn.Module, split: _data.Split, size: int, out: Path) -> None:
    """A ``size`` x ``size`` canvas with an item every 48 pixels or so, scanned in tiles."""
    from convify.dense import heatmap, scan  # noqa: PLC0415

    g = torch.Generator().manual_seed(2)
    count = (size // 48) ** 2
    canvas, placed = canvases(split, 1, count, size, seed=3) if count <= 64 else _grid(split, size, g)
    pixels = (canvas[0] * 255).round().to(torch.uint8)  # as an image file would give it
    began = time.perf_counter()
    result = scan(dense, pixels, tile=min(512, size // 4), progress=True)
    seconds = time.perf_counter() - began
    with torch.no_grad():
        whole = dense(pixels[None].float() / 255)
    deviation = float((result.scores - whole).abs().max() / whole.abs().max())
    hits = sum(int(result.scores[0, :, y // STRIDE, x // STRIDE].argmax()) == label for y, x, label, _ in placed[0])
    print(f"large canvas {size}x{size}: {len(result.plan.tiles)} tiles of {result.plan.tile[0]} px (halo overhead "
          f"{result.plan.overhead:.2f}x) -> map {tuple(result.scores.shape[1:])} in {seconds:.1f} s; tiled vs one "
          f"pass: max dev / max {deviation:.1e}; top class at the item's spot: {hits}/{len(placed[0])}")
    heatmap(pixels, result.scores, result.plan.geometry, side=1024).save(out / "dense_heatmap_large.png")
    print(f"wrote {out / 'dense_heatmap_large.png'}")


def _grid(split: _data.Split, size: int, g: torch.Generator
          ) -> tuple[torch.Tensor, list[list[tuple[int, int, int, int]]]]:
    """Items on a jittered 48-pixel grid (random placement without overlap gets slow for thousands)."""
    canvas = torch.zeros(1, 1, size, size)
    row = []
    for y0 in range(0, size - 48 + 1, 48):
        for x0 in range(0, size - 48 + 1, 48):
            y, x = (y0 + STRIDE * torch.randint(0, 5, (2,), generator=g)).tolist()[0], \
                (x0 + STRIDE * torch.randint(0, 5, (2,), generator=g)).tolist()[1]
            i = int(torch.randint(0, len(split.labels), (1,), generator=g))
            canvas[0, :, y:y + ITEM, x:x + ITEM] = split.images[i]
            row.append((y, x, int(split.labels[i]), i))
    return canvas, [row]


if __name__ == "__main__":
    main()
