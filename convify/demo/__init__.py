"""``convify demo``: the main job on embedded defaults, no download.

1. ``replace_maxpool`` on a small All-CNN style network, torchvision's resnet18
   and vgg11 (random weights): the reports, and checks on the spot that output
   shapes are kept and that ``init="avg"`` computes exactly average pooling;
2. ``replace_linear_head(dense=True)`` on vgg11: exact at 224x224, and a score
   map from a larger image in one pass;
3. ``replace_maxpool(mode="exact")`` on resnet18: convolutions and ReLUs that
   compute the same function, checked against the original;
4. ``convify.convify`` on Model C (``pool="exact"`` too) and resnet18, exported
   to ONNX and verified in onnxruntime against the original model: the
   verification tables.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn

from convify import api
from convify.core.report import report
from convify.demo.reference import avg_reference
from convify.wording import counted
from convify.zoo import model_c


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    import torchvision  # noqa: PLC0415  (only the demo needs the zoo)
    torch.manual_seed(0)
    return [
        ("All-CNN style Model C", model_c().eval(), (2, 3, 32, 32)),
        ("torchvision resnet18", torchvision.models.resnet18(weights=None).eval(), (2, 3, 224, 224)),
        ("torchvision vgg11", torchvision.models.vgg11(weights=None).eval(), (2, 3, 224, 224)),
    ]


def _show_maxpool(title: str, model: nn.Module, shape: tuple[int, ...], out) -> bool:
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
    print(f"avg init equals the model with its {counted(pools, 'max pooling')} computed as average pooling: "
          f"max relative error {err:.1e} ({'ok' if err <= 1e-5 else 'FAILED'})", file=out)
    print(file=out)
    return ok


def _show_dense_head(title: str, model: nn.Module, out) -> bool:
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    fcn = api.replace_linear_head(model, x, dense=True)
    seconds = time.perf_counter() - start
    print(f"== {title}: replace_linear_head(dense=True) ({seconds:.2f} s)", file=out)
    print(report(fcn), file=out)
    big = torch.randn(1, 3, 320, 320)
    original, converted, scores = model(x), fcn(x), fcn(big)
    err = _rel_err(converted.flatten(1), original)
    print(f"at 224x224 the convolutional head equals the Linear head: max relative error {err:.1e} "
          f"({'ok' if err <= 1e-5 else 'FAILED'})", file=out)
    print(f"a 320x320 image gives a {'x'.join(map(str, scores.shape[1:]))} map of class scores in one pass",
          file=out)
    print(file=out)
    return err <= 1e-5 and scores.dim() == 4


def _show_exact(title: str, model: nn.Module, shape: tuple[int, ...], out) -> bool:
    x = torch.randn(shape)
    start = time.perf_counter()
    exact = api.replace_maxpool(model, x[:1], mode="exact")
    seconds = time.perf_counter() - start
    print(f"== {title}: replace_maxpool(mode='exact') ({seconds:.2f} s)", file=out)
    print(report(exact), file=out)
    err = _rel_err(exact(x), model(x))
    print(f"the exact rewrite computes the original's function: max relative error {err:.1e} "
          f"({'ok' if err <= 1e-5 else 'FAILED'})", file=out)
    print(file=out)
    return err <= 1e-5


def _show_verify(title: str, slug: str, model: nn.Module, shape: tuple[int, ...], folder: str, out,
                 **options) -> bool:
    from pathlib import Path  # noqa: PLC0415

    from convify.demo.printing import demo_verify  # noqa: PLC0415  (onnx and onnxruntime load here only)

    x = torch.randn(1, *shape[1:])
    allconv = api.convify(model, x, **options)
    path = Path(folder) / f"{slug}-allconv.onnx"
    given = "".join(f", {k}={v!r}" for k, v in options.items())
    print(f"== {title}: convify.convify(model{given}), exported and verified in onnxruntime", file=out)
    result = demo_verify(model, allconv, x, path=path, echo=lambda line: print(line, file=out), temporary=True)
    print(file=out)
    return result.passed


def main(argv: list[str] | None = None, out=sys.stdout) -> int:
    """Run the demo; returns a process exit code (0 when every check held)."""
    import tempfile  # noqa: PLC0415

    torch.set_grad_enabled(False)
    models = _models()
    ok = True
    for title, model, shape in models:
        ok &= _show_maxpool(title, model, shape, out)
    ok &= _show_dense_head(*models[2][:2], out)
    ok &= _show_exact(*models[1], out)
    with tempfile.TemporaryDirectory(prefix="convify-demo-") as folder:
        for (title, model, shape), slug in zip(models[:2], ("model_c", "resnet18")):
            ok &= _show_verify(title, slug, model, shape, folder, out)
        ok &= _show_verify(models[0][0], "model_c-exact", *models[0][1:], folder, out, pool="exact")
    print("demo: every check held" if ok else "demo: a check FAILED", file=out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
