"""The steps on a model that commands share: load MODEL, work out its input
shape, rewrite it (with calibration images when a pass needs them), export it
and verify a rewrite of it."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Sequence

from convify.cli.console import Progress, shape_text
from convify.errors import ConvifyError, DataError, ExampleInputError, RewriteError, UsageError, one_line
from convify.recovery import SYNTHETIC
from convify.wording import counted

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from convify.io import ModelSource, RecipePass


def load_model(args: argparse.Namespace) -> "ModelSource":
    """MODEL as the model arguments give it (a file, a folder, or --arch with --weights)."""
    from convify.io import open_model, parse_arch_kwargs  # noqa: PLC0415

    return open_model(args.model, arch=args.arch, arch_kwargs=parse_arch_kwargs(args.arch_kwargs),
                      weights=args.weights, trust_pickle=args.trust_pickle, trust_code=args.trust_code)


def resolve_shape(src: "ModelSource", given: tuple[int, ...] | None) -> tuple[int, ...]:
    """The given shape (checked by one forward pass), the checkpoint's, or one
    worked out from the model."""
    import torch  # noqa: PLC0415

    from convify.fx.inputs import zeros_like_model  # noqa: PLC0415

    if given is None and src.input_shape is not None:
        return tuple(src.input_shape)
    if given is None:
        from convify.fx.inputs import probe_input  # noqa: PLC0415

        try:
            return tuple(probe_input(src.model).shape)
        except ExampleInputError as e:
            raise ExampleInputError(f"could not work out an input shape for {src.label}: {e}; "
                                    "pass --input-shape N,C,H,W") from e
    _check_rank(src, given)
    try:
        with torch.no_grad():
            src.model(zeros_like_model(src.model, given))
    except Exception as e:
        raise ExampleInputError(f"{src.label} does not run on an input of shape {shape_text(given)}: "
                                f"{one_line(e)}; pass the --input-shape it expects") from e
    return given


def _check_rank(src: "ModelSource", given: tuple[int, ...]) -> None:
    """Refuse an ``--input-shape`` of another rank than the model's first convolution takes: torch would read
    1,3,224 as one unbatched image and fail later, or not at all."""
    from convify.fx.inputs import first_conv  # noqa: PLC0415

    conv = first_conv(src.model)
    if conv is None:
        return
    dims = len(conv.kernel_size)
    if len(given) != dims + 2:
        example = ",".join(map(str, (1, conv.in_channels, *given[2:2 + dims], *(224,) * (dims - len(given[2:])))))
        raise UsageError(f"--input-shape {','.join(map(str, given))} has {counted(len(given), 'dimension')}, but "
                         f"{src.label} starts with a {type(conv).__name__}: it takes {dims + 2} (N,C and "
                         f"{dims} spatial), e.g. --input-shape {example}")


def load_and_rewrite(args: argparse.Namespace, progress: Progress, shape: tuple[int, ...] | None,
                     options: dict[str, Any], step: str) -> tuple["ModelSource", tuple[int, ...], "nn.Module"]:
    """The first two steps of inspect, rewrite and verify: read MODEL, then rewrite it."""
    with progress.step("loading the model"):
        src = load_model(args)
        shape = resolve_shape(src, shape)
    with progress.step(step):
        rewritten = rewrite_model(src, options, shape, args)
    return src, shape, rewritten


def rewrite_model(src: "ModelSource", options: dict[str, Any], shape: tuple[int, ...],
                  args: argparse.Namespace) -> "nn.Module":
    """The passes the flags ask for, applied with the one code path that
    rebuilds checkpoints (``convify.io.apply_passes``)."""
    import torch  # noqa: PLC0415

    from convify.io import apply_passes, plan_passes  # noqa: PLC0415

    torch.manual_seed(0)  # --init kaiming gives the same weights on every run
    passes = plan_passes(options, shape, only=args.only, skip=args.skip)
    calibration = _calibration(args, passes, shape)
    try:
        rewritten = apply_passes(src.model, passes, calibration=calibration)
        if not getattr(args, "reconstruct", False):
            return rewritten
        from convify.recovery.reconstruction import reconstruct  # noqa: PLC0415

        return reconstruct(src.model, rewritten, calibration, steps=args.reconstruct_steps, lr=args.reconstruct_lr,
                           progress=False)
    except ConvifyError:
        raise
    except Exception as e:
        raise RewriteError(f"rewriting {src.label} failed: {one_line(e)}") from e


def _calibration(args: argparse.Namespace, passes: Sequence["RecipePass"], shape: tuple[int, ...]
                 ) -> list[Any] | str | None:
    """Batches of images from ``--calibration DIR``, resized to the input
    shape, when a pass or ``--reconstruct`` needs them (None otherwise; the
    word ``synthetic`` as it is)."""
    needing = [p.options for p in passes if p.options.needs_calibration()]
    reconstructing = getattr(args, "reconstruct", False)
    if not needing and not reconstructing:
        return None
    if not args.calibration:
        if not needing:
            raise UsageError("--reconstruct needs --calibration DIR, a folder of images (or --calibration "
                             "synthetic) to reconstruct on")
        field, value = needing[0].calibration_option()
        raise UsageError(f"--{field.replace('_', '-')} {value} needs --calibration DIR, a folder of images to fit "
                         "the new weights on (or --calibration synthetic)")
    if args.calibration == SYNTHETIC:
        return SYNTHETIC
    return folder_batches(args.calibration, shape, args.calibration_images)


def folder_batches(folder: str, shape: tuple[int, ...], at_most: int) -> list[Any]:
    """The first ``at_most`` images of ``folder`` (``convify.recovery``'s
    ``image_folder``: flat, or class subfolders), resized to ``shape``, in
    batches of 32."""
    import torch  # noqa: PLC0415

    from convify.recovery.distillation import image_folder  # noqa: PLC0415

    data = image_folder(folder, shape)
    count = min(len(data), max(1, at_most))
    images = [data[i][0] if isinstance(data[i], tuple) else data[i] for i in range(count)]
    return list(torch.stack(images).split(32))


def random_input(model: "nn.Module", shape: tuple[int, ...]) -> "torch.Tensor":
    """A seeded random input of ``shape`` on the model's device and dtype."""
    import torch  # noqa: PLC0415

    from convify.fx.inputs import zeros_like_model  # noqa: PLC0415

    like = zeros_like_model(model, shape)
    g = torch.Generator().manual_seed(0)
    return torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)


def export_model(model: "nn.Module", path: str, shape: tuple[int, ...], **options: Any) -> Any:
    from convify import export_onnx  # noqa: PLC0415  (onnx and the exporter load here, not before)

    return export_onnx(model, path, random_input(model, shape), **options)


def verify_rewrite(original: "nn.Module", rewritten: "nn.Module", shape: tuple[int, ...],
                   args: argparse.Namespace) -> Any:
    """``convify.verify`` with the verification and ONNX flags, on the
    inputs ``--inputs`` and ``--inputs-count`` ask for."""
    import dataclasses  # noqa: PLC0415

    from convify.export.verify import verify  # noqa: PLC0415  (onnx, onnxruntime)

    inputs, source = _verification_inputs(original, shape, args)
    verification = verify(original, rewritten, random_input(original, shape), inputs=inputs,
                          provider=args.provider, atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement,
                          exporter=args.exporter, opset=args.opset)
    return verification if source is None else dataclasses.replace(verification, inputs_source=source)


def check_inputs_flags(args: argparse.Namespace) -> None:
    """``--inputs`` and ``--inputs-count`` refused before any work when they cannot be honoured."""
    if args.inputs_count is not None and args.inputs_count < 1:
        raise UsageError(f"--inputs-count {args.inputs_count}: give a positive number of inputs")
    if args.inputs and not os.path.isdir(args.inputs):
        raise UsageError(f"--inputs {args.inputs}: no such folder (give a folder of images)")


def _verification_inputs(model: "nn.Module", shape: tuple[int, ...], args: argparse.Namespace
                         ) -> tuple[list[Any] | None, str | None]:
    """The batches to verify on and where they came from (None, None: ``verify``'s own random ones)."""
    check_inputs_flags(args)
    count = args.inputs_count
    from convify.fx.inputs import zeros_like_model  # noqa: PLC0415

    like = zeros_like_model(model, shape)
    if args.inputs:
        try:
            batches = folder_batches(args.inputs, shape, 1000 if count is None else count)
        except DataError as e:
            raise UsageError(f"--inputs {e}") from e
        batches = [b.to(like.dtype).to(like.device) for b in batches]
        return batches, f"{sum(len(b) for b in batches)} images from {args.inputs}"
    if count is None:
        return None, None
    import torch  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    noise = torch.randn((count, *like.shape[1:]), generator=g).to(like.dtype).to(like.device)
    return list(noise.split(32)), "seeded random"
