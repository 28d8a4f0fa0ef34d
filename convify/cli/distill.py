"""``convify distill``: train a rewritten model toward the original on a folder of images."""
from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from convify.cli.arguments import given_shape, json_argument, output_arguments
from convify.cli.command import EXIT_OK, Command
from convify.cli.console import note, print_json
from convify.errors import UsageError

if TYPE_CHECKING:
    import torch.nn as nn

    from convify.io import ModelSource


def add_arguments(p: argparse.ArgumentParser) -> None:
    from convify.recovery.distillation import PRECISIONS  # noqa: PLC0415  (imports torch)

    p.add_argument("model", metavar="REWRITTEN", help="the rewritten model: a convify checkpoint (from `convify "
                                                      "rewrite`), or a pickled module with --trust-pickle")
    p.add_argument("--teacher", required=True, metavar="MODEL",
                   help="the original model: a state_dict of REWRITTEN's architecture (.pt/.pth/.safetensors), "
                        "a convify checkpoint, or a pickled module with --trust-pickle")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="training images: an ImageFolder directory (labels from its subfolders) or a flat "
                        "folder of images (pure distillation, no labels)")
    p.add_argument("--val-data", metavar="DIR", help="images to measure agreement (and accuracy) on each epoch")
    output_arguments(p, "the distilled model to write (same format as REWRITTEN)")
    g = p.add_argument_group("distillation (defaults: those of convify.distill)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--temperature", type=float, default=4.0)
    g.add_argument("--alpha", type=float, default=0.9, help="weight of distillation against the labels")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="save the training state there after every epoch")
    g.add_argument("--resume", action="store_true", help="continue from the state in --checkpoint-dir")
    g.add_argument("--input-shape", metavar="N,C,H,W",
                   help="size the images are resized to (default: REWRITTEN's example input shape)")
    g = p.add_argument_group("training speed (defaults: those of convify.distill)")
    g.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="autocast the forward passes to bfloat16 or float16 (with loss scaling); default: fp32")
    g.add_argument("--channels-last", action="store_true",
                   help="train with weights and images in channels-last memory format (faster on recent GPUs)")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes that read and decode the images (default: 0, in this process)")
    g.add_argument("--compile", action="store_true", help="train a torch.compile-d student")
    p.add_argument("--trust-pickle", action="store_true", help="allow files holding pickled Python objects")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a convify checkpoint whose recipe imports package.module:factory")
    json_argument(p)


def run(args: argparse.Namespace) -> int:
    """Distill REWRITTEN toward --teacher on the images in --data; write OUT."""
    import torch  # noqa: PLC0415

    from convify import io as ck  # noqa: PLC0415
    from convify.recovery.distillation import distill, image_folder  # noqa: PLC0415

    ck.check_output(args.output, force=args.force, inputs=[args.model, args.teacher])
    student_src = ck.open_model(args.model, trust_pickle=args.trust_pickle, trust_code=args.trust_code)
    teacher = _open_teacher(args, student_src)
    shape = given_shape(args) or student_src.input_shape or tuple(_probe_shape(student_src))
    data = image_folder(args.data, shape)
    val = image_folder(args.val_data, shape) if args.val_data else None
    history = distill(teacher, student_src.model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      temperature=args.temperature, alpha=args.alpha, val_data=val, device=args.device,
                      progress=not args.json, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                      precision=args.precision, channels_last=args.channels_last, workers=args.workers,
                      compile=args.compile)
    student = student_src.model.cpu().eval()
    if student_src.pickled:
        ck.save_pickled(student, args.output, force=args.force, inputs=[args.model, args.teacher])
    else:
        recipe = ck.recipe_of(ck.read_file(args.model))
        payload = ck.to_checkpoint(student, recipe)
        ck.atomic_write(args.output, lambda tmp: torch.save(payload, tmp), force=args.force,
                        inputs=[args.model, args.teacher])
    if args.json:
        print_json({"history": dataclasses.asdict(history), "written": [args.output]})
    else:
        print(history)
        note(f"wrote {args.output}")
    return EXIT_OK


def _open_teacher(args: argparse.Namespace, student_src: "ModelSource") -> "nn.Module":
    """A convify checkpoint or pickled module as it is; a bare state_dict on
    the architecture the student's recipe names."""
    from convify import io as ck  # noqa: PLC0415

    content = ck.read_file(args.teacher, trust_pickle=args.trust_pickle, what="teacher file")
    if ck.is_checkpoint(content):
        return ck.open_model(args.teacher, trust_code=args.trust_code).model
    weights = ck.unwrap(content, args.teacher)
    if not isinstance(weights, dict):  # a whole module (read with --trust-pickle)
        return weights.eval()
    if student_src.arch is None:
        raise UsageError(f"{args.teacher} is a state_dict, and {args.model} names no architecture to load it "
                         "into; give the teacher as a convify checkpoint or a pickled module")
    return ck.open_model(arch=str(student_src.arch), arch_kwargs=student_src.arch_kwargs,
                         weights=args.teacher, trust_pickle=args.trust_pickle).model


def _probe_shape(src: "ModelSource") -> tuple[int, ...]:
    from convify.fx.inputs import probe_input  # noqa: PLC0415

    return tuple(probe_input(src.model).shape)


DISTILL = Command("distill", "train a rewritten model toward the original on a folder of images", add_arguments,
                  run)
