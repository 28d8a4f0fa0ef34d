"""A subcommand's record and the exit codes its body returns."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, its arguments and its body."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]
