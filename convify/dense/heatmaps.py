"""Heat maps: a score map drawn over the image it was computed from, as a Pillow picture."""
from __future__ import annotations

from typing import Any

import torch

from convify.dense.geometry import Geometry
from convify.errors import UsageError
from convify.wording import counted

#: A perceptually ordered colormap (viridis' ends and midpoints), interpolated linearly.
_STOPS = ((0.267, 0.005, 0.329), (0.231, 0.322, 0.546), (0.128, 0.567, 0.551), (0.369, 0.789, 0.383),
          (0.993, 0.906, 0.144))
HEATMAP_SIDE = 2048  # the longest side of a heat map picture


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (any shape) to RGB in [0, 1] (shape + (3,))."""
    stops = torch.tensor(_STOPS)
    x = values.clamp(0, 1) * (len(_STOPS) - 1)
    low = x.floor().long().clamp(max=len(_STOPS) - 2)
    frac = (x - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def class_colours(count: int) -> torch.Tensor:
    """``count`` distinct saturated colours (hues a golden angle apart), (count, 3) in [0, 1]."""
    import colorsys  # noqa: PLC0415

    return torch.tensor([colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0) for k in range(count)])


def heatmap(image: torch.Tensor, scores: torch.Tensor, geometry: Geometry, class_index: int | None = None,
            side: int = HEATMAP_SIDE) -> "Any":
    """A Pillow image: ``image`` (C, H, W, uint8 or in [0, 1]) dimmed, under the score map drawn at its
    windows' centres. With ``class_index``: that class's probability (softmax over the classes; sigmoid
    for one class) through :func:`colormap`; else each position in its top class's colour, as bright as
    that class's probability relative to the highest on the map. Scaled so that the longer side is at
    most ``side`` pixels."""
    from PIL import Image  # noqa: PLC0415

    k = scores.shape[1]
    if class_index is not None and not 0 <= class_index < k:
        raise UsageError(f"class {class_index} does not exist: the map has {counted(k, 'class', 'classes')} "
                         f"(0 .. {k - 1})")
    logits = scores[0].float()
    probs = logits.sigmoid() if k == 1 else logits.softmax(0)
    if class_index is not None:
        rgb = colormap(probs[class_index])
    else:
        top, which = probs.max(0)
        rgb = class_colours(k)[which] * (top / top.max().clamp_min(1e-12))[..., None]
    heat = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), "RGB")
    base = _picture(image)
    (sh, sw), (rh, rw), (oh, ow) = geometry.stride, geometry.size, geometry.offset
    # map position (i, j) is drawn over the stride-sized cell centred on its window's centre
    top_left = (ow + (rw - 1) / 2 - (sw - 1) / 2, oh + (rh - 1) / 2 - (sh - 1) / 2)
    heat = heat.resize((heat.width * sw, heat.height * sh), Image.NEAREST)
    layer = Image.new("RGB", base.size)
    layer.paste(heat, (round(top_left[0]), round(top_left[1])))
    mask = Image.new("L", base.size, 0)
    mask.paste(255, (round(top_left[0]), round(top_left[1]), round(top_left[0]) + heat.width,
                     round(top_left[1]) + heat.height))
    dimmed = Image.blend(base, Image.new("RGB", base.size), 0.5)
    out = Image.composite(Image.blend(dimmed, layer, 0.7), dimmed, mask)
    scale = min(1.0, side / max(out.size))
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.BILINEAR)
    return out


def _picture(image: torch.Tensor) -> "Any":
    from PIL import Image  # noqa: PLC0415

    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        lo, hi = float(x.min()), float(x.max())
        x = ((x.float() - lo) / max(hi - lo, 1e-12) * 255).round().to(torch.uint8)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return Image.fromarray(x[:3].permute(1, 2, 0).contiguous().numpy(), "RGB")
