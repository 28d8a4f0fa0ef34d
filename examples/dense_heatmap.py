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
the one pass. ``dense_heatmap_large.png`` shows a 288x288 region of the canvas
enlarged beside its top-class map (each position in its class's colour, paler
the less sure), each item boxed in its class's colour with a dot in the map's
colour at the item's own window, a legend of the ten classes, and the whole
canvas and its map in small with the region boxed.

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


#: One colour per class, told apart on white and when pale: tab10 with its grey (which reads as "no class")
#: swapped for black.
CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#000000", "#bcbd22", "#17becf")
ZOOM = 288  # side of the zoomed region in canvas pixels: 6 x 6 items of the 48-pixel grid
PALE = 0.45  # the map's colours at most this strong, so that the dots at the items' own windows stand out


def zoom_region(size: int) -> tuple[int, int, int]:
    """(top, left, side) of the region shown enlarged: near the canvas centre, on the 48-pixel item grid."""
    side = min(ZOOM, size // 2)
    corner = max(0, (size // 2 - side // 2) // 48 * 48)
    return corner, corner, side


def _within(item: tuple[int, int, int, int], region: tuple[int, int, int]) -> bool:
    y, x, _, _ = item
    top, left, side = region
    return top <= y and y + ITEM <= top + side and left <= x and x + ITEM <= left + side


def blank_windows(pixels: torch.Tensor, scores: torch.Tensor) -> str:
    """What the map says where its 28x28 window holds no item pixel (the gaps between items)."""
    window = nn.functional.max_pool2d(pixels[None].float(), ITEM, STRIDE)[0, 0]
    h, w = scores.shape[-2:]
    blank = window[:h, :w] == 0
    if not blank.any():
        return "no window without an item pixel"
    top, which = scores[0].softmax(0).max(0)
    counts = torch.bincount(which[blank], minlength=len(_data.CLASSES))
    k = int(counts.argmax())
    return (f"windows with no item pixel ({float(blank.float().mean()):.0%} of the map): top class "
            f"{_data.CLASSES[k]} at {float(counts[k]) / int(blank.sum()):.0%} of them, mean top probability "
            f"{float(top[blank].mean()):.2f}")


def plot_large(pixels: torch.Tensor, scores: torch.Tensor, geometry: convify.dense.Geometry,
               items: list[tuple[int, int, int, int]], region: tuple[int, int, int], path: Path,
               source: str) -> None:
    """The whole canvas and its top-class map (small, the region boxed), the region enlarged beside its map
    with each item's class and the map's top class at the item's own window, and the classes' colours."""
    from matplotlib.colors import to_rgb  # noqa: PLC0415
    from matplotlib.patches import Patch, Rectangle  # noqa: PLC0415

    size = pixels.shape[-1]
    top, left, side = region
    best, which = scores[0].float().softmax(0).max(0)
    # each position in its top class's colour, paler the lower that class's probability, over white
    colours = torch.tensor([to_rgb(c) for c in CLASS_COLOURS])
    rgb = 1 - PALE * best[..., None] * (1 - colours[which])
    h, w = which.shape
    (sh, sw), (rh, rw), (oh, ow) = geometry.stride, geometry.size, geometry.offset
    # map position (i, j) drawn centred on its window's centre, in canvas pixel coordinates (pixel k spans k +- 0.5)
    y0, x0 = oh + (rh - 1) / 2 - sh / 2, ow + (rw - 1) / 2 - sw / 2
    extent = (x0, x0 + sw * w, y0 + sh * h, y0)
    shrink = max(1, size // 384)  # the overview of the canvas: mean of shrink x shrink pixels
    small = nn.functional.avg_pool2d(pixels[None].float(), shrink)[0, 0] / 255
    small_extent = (-0.5, -0.5 + shrink * small.shape[1], -0.5 + shrink * small.shape[0], -0.5)
    inside = [item for item in items if _within(item, region)]
    called = [int(which[y // STRIDE, x // STRIDE]) for y, x, _, _ in inside]  # the map at the item's own window
    wrong = sum(c != label for c, (_, _, label, _) in zip(called, inside))

    fig = plt.figure(figsize=(13, 6.6), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 2, 2])
    overview_canvas, overview_map = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    zoom_canvas, zoom_map = fig.add_subplot(grid[:, 1]), fig.add_subplot(grid[:, 2])
    overview_canvas.imshow(small, cmap="gray", vmin=0, vmax=1, extent=small_extent)
    overview_map.imshow(rgb, extent=extent)
    zoom_canvas.imshow(pixels[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    zoom_map.imshow(rgb, extent=extent, interpolation="nearest")
    for ax, title in ((overview_canvas, f"whole canvas, {size}x{size}"), (overview_map, "its top-class map")):
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
        for colour, width in (("black", 3.5), ("white", 1.5)):
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False, edgecolor=colour,
                                   linewidth=width))
        ax.set_title(title, fontsize=10)
        ax.set_xticks([0, size // 2, size])
        ax.set_yticks([0, size // 2, size])
        ax.tick_params(labelsize=7)
    for (y, x, label, _), c in zip(inside, called):
        zoom_canvas.add_patch(Rectangle((x - 0.5, y - 0.5), ITEM, ITEM, fill=False, linewidth=0.8, edgecolor="0.55"))
        zoom_map.add_patch(Rectangle((x - 0.5, y - 0.5), ITEM, ITEM, fill=False, linewidth=2,
                                     edgecolor=CLASS_COLOURS[label]))
        zoom_map.plot(x + (ITEM - 1) / 2, y + (ITEM - 1) / 2, marker="o", markersize=13, markeredgecolor="white",
                      markeredgewidth=1.2, color=CLASS_COLOURS[c])
    zoom_canvas.set_title(f"the boxed region enlarged, {side}x{side} pixels: {len(inside)} items", fontsize=11)
    zoom_map.set_title(f"its map. Box: the item's class; dot: the map's top class\nat the item's own window "
                       f"({wrong} of {len(inside)} differ); pale: other windows", fontsize=11)
    fig.suptitle(f"{len(items):,} {source} items on a {size}x{size} canvas, scored at every {STRIDE}-pixel step "
                 f"by the dense classifier", fontsize=12)
    for ax in (zoom_canvas, zoom_map):
        ax.set_xlim(left - 0.5, left + side - 0.5)
        ax.set_ylim(top + side - 0.5, top - 0.5)
        ax.tick_params(labelsize=7)
    fig.legend(handles=[Patch(facecolor=c, label=name) for c, name in zip(CLASS_COLOURS, _data.CLASSES)],
               loc="outside lower center", ncol=10, fontsize=11, frameon=False, handlelength=1.4,
               columnspacing=1.3)
    save_small(fig, path)
    plt.close(fig)


def save_small(fig: plt.Figure, path: Path) -> None:
    """The figure as a PNG of 256 colours: the class colours exact, 16 pale tints of each, 64 greys.

    A third of the bytes of the full-colour file; a palette made from the picture itself would shift the
    class colours, so it is made from what the picture is drawn with.
    """
    import io  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from matplotlib.colors import to_rgb  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    colours = torch.tensor([to_rgb(c) for c in CLASS_COLOURS])
    strength = torch.linspace(0, PALE, 16)[:, None, None]
    palette = torch.cat([colours, (1 - strength * (1 - colours)).reshape(-1, 3),
                         torch.linspace(0, 1, 64)[:, None].expand(-1, 3)])
    palette = (palette * 255).round()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    drawn = Image.open(buffer).convert("RGB")
    seen, where = torch.from_numpy(np.array(drawn)).reshape(-1, 3).unique(dim=0, return_inverse=True)
    # each colour drawn to its nearest palette colour (Pillow's own quantize rounds white to 251)
    index = torch.cdist(seen.float(), palette).argmin(1)[where]
    picture = Image.frombytes("P", drawn.size, index.to(torch.uint8).numpy().tobytes())
    picture.putpalette(palette.to(torch.uint8).flatten().tolist())
    picture.save(path, optimize=True)


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
    large_canvas(dense, data.test, 256 if args.quick else args.large, args.out, data.source)


def large_canvas(dense: nn.Module, split: _data.Split, size: int, out: Path, source: str) -> None:
    """A ``size`` x ``size`` canvas with an item every 48 pixels or so, scanned in tiles."""
    from convify.dense import scan  # noqa: PLC0415

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
    region = zoom_region(size)
    inside = [item for item in placed[0] if _within(item, region)]
    named = sum(int(result.scores[0, :, y // STRIDE, x // STRIDE].argmax()) == label for y, x, label, _ in inside)
    print(f"zoomed region {region[2]}x{region[2]} px at (x {region[1]}, y {region[0]}): top class at the item's "
          f"spot: {named}/{len(inside)}; {blank_windows(pixels, result.scores)}")
    plot_large(pixels, result.scores, result.plan.geometry, placed[0], region, out / "dense_heatmap_large.png", source)
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
