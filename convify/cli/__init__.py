"""The ``convify`` command line (also ``python -m convify``).

::

    convify inspect --arch torchvision:resnet18 --weights resnet18.pth
    convify rewrite --arch torchvision:resnet18 --weights resnet18.pth -o allconv.pt --onnx allconv.onnx
    convify rewrite my-hf-resnet/ -o allconv.pt        # a Hugging Face folder (pip install -e '.[hf]')
    convify verify allconv.pt --head none
    convify export allconv.pt -o allconv.onnx --dynamic-spatial
    convify scan --arch torchvision:resnet18 --weights resnet18.pth slide.tiff -o scores.npy --png heat.png

Exit codes: 0 success (also when there was nothing to rewrite), 1 a failed
rewrite or verification, 2 bad usage or unreadable input. Errors are one line
on stderr (``--debug`` adds the traceback); reports go to stdout, notes to
stderr, so ``--json`` output can be piped.

One module per command, each with a function that adds its arguments, one
that runs it and its :class:`~convify.cli.command.Command` record:
``inspect``, ``rewrite``, ``export``, ``verify``, ``scan``, ``demo``,
``distill``. Adding a command means adding its file and one entry in
:data:`convify.cli.parser.COMMANDS`, the explicit order ``--help`` lists them
in. What the commands share:

- ``command``: the ``Command`` record and the exit codes;
- ``parser``: ``COMMANDS`` and :func:`build_parser`;
- ``arguments``: the shared argument groups (the model, the rewrite flags
  made from the options each registered rewrite declares, so a new rewrite
  brings its flags with it; outputs, verification, ONNX) and reading them back;
- ``models``: loading MODEL, its input shape, rewriting (with calibration
  images), exporting and verifying;
- ``summary``: the report, summary and verification inspect, rewrite and
  verify print;
- ``console``: notes, JSON and progress;
- ``errors``: library errors as one line and an exit code, in the command
  line's flags.

Heavy modules (torch, the rewrite engine, onnx, onnxruntime) are imported
only for the command that runs: ``convify --help`` imports none of them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Sequence

from convify.cli.command import EXIT_FAILED, EXIT_USAGE
from convify.cli.errors import classify
from convify.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv=argv)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of convify's
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("convify: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # every error ends as one line and an exit code
        if args.debug:
            traceback.print_exc()
        code, text = classify(e)
        print(f"convify: error: {text}", file=sys.stderr)
        return code
