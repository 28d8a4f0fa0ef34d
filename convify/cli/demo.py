"""``convify demo``: rewrite, export and verify a small model, step by step."""
from __future__ import annotations

import argparse

from convify.cli.command import EXIT_OK, Command
from convify.errors import UsageError


def run(args: argparse.Namespace) -> int:
    """Rewrite, export and verify a small model, printing each step."""
    try:
        from convify import demo  # noqa: PLC0415
    except ModuleNotFoundError as e:
        if e.name != "convify.demo":
            raise
        raise UsageError("the demo is not part of this installation of convify") from e
    code = demo.main()
    return EXIT_OK if code is None else int(code)


#: No arguments of its own.
DEMO = Command("demo", "rewrite, export and verify a small model, step by step", None, run)
