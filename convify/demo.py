"""``convify demo``: the main job on embedded defaults, no download.

Rewrites torchvision's vgg11 and resnet18 and a small All-CNN style network
(random weights), prints each report, and checks on the spot that output
shapes are kept and that ``init="avg"`` computes exactly average pooling.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch
import torch.nn as nn

from . import api
from .reference import avg_reference
from .report import report


def model_c(num_classes: int = 10) -> nn.Sequential:
    """A small max-pool network in the spirit of Springenberg et al.'s Model C
    (conv, conv, max pooling, twice; then 1x1 convolutions and a global average)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(),
        nn.Conv2d(64, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _models() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    import torchvision  # noqa: PLC0415  (only the demo needs the zoo)
    return [
        ("All-CNN style Model C", model_c, (2, 3, 32, 32)),
        ("torchvision resnet18", lambda: torchvision.models.resnet18(weights=None), (2, 3, 224, 224)),
        ("torchvision vgg11", lambda: torchvision.models.vgg11(weights=None), (2, 3, 224, 224)),
    ]


def _show_maxpool(title: str, build: Callable[[], nn.Module], shape: tuple[int, ...], out) -> bool:
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    start = time.perf_counter()
    rewritten = api.replace_maxpool(model, x[:1])
    seconds = time.perf_counter() - start
    print(f"== {title}: replace_maxpool ({seconds:.2f} s)", file=out)
    print(report(rewritten), file=out)
    with torch.no_grad():
        before, after = model(x), rewritten(x)
    reference, pools = avg_reference(model, x)
    err = _rel_err(after, reference)
    shapes_kept = before.shape == after.shape
    ok = shapes_kept and err <= 1e-5
    print(f"output shape kept: {tuple(before.shape)} -> {tuple(after.shape)}: {'yes' if shapes_kept else 'NO'}",
          file=out)
    print(f"avg init equals the model with its {pools} max poolings computed as average pooling: "
          f"max relative error {err:.1e} ({'ok' if err <= 1e-5 else 'FAILED'})", file=out)
    print(file=out)
    return ok


def main(argv: list[str] | None = None, out=sys.stdout) -> int:
    """Run the demo; returns a process exit code (0 when every check held)."""
    torch.set_grad_enabled(False)
    ok = True
    for title, build, shape in _models():
        ok &= _show_maxpool(title, build, shape, out)
    print("demo: every check held" if ok else "demo: a check FAILED", file=out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
