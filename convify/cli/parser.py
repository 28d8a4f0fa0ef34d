"""The ``convify`` argument parser, one subparser per command in :data:`COMMANDS`."""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from convify.cli.command import Command
from convify.cli.demo import DEMO
from convify.cli.distill import DISTILL
from convify.cli.export import EXPORT
from convify.cli.inspect import INSPECT
from convify.cli.rewrite import REWRITE
from convify.cli.scan import SCAN
from convify.cli.verify import VERIFY

#: The commands, in the order ``convify --help`` lists them.
COMMANDS: tuple[Command, ...] = (INSPECT, REWRITE, EXPORT, VERIFY, SCAN, DEMO, DISTILL)


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser that takes options anywhere between its positionals: ``convify scan MODEL --tile 64
    IMAGE`` (plain argparse gives IMAGE to the optional MODEL when an option sits between them)."""

    _inner = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inner:  # parse_known_intermixed_args itself calls parse_known_args (Python < 3.12)
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser(commands: Sequence[Command] = COMMANDS, argv: Sequence[str] | None = None
                 ) -> argparse.ArgumentParser:
    """The argument parser: one subparser per row of ``commands``. Only the
    command named in ``argv`` gets its arguments (building them may import
    torch; ``convify --help`` must not); None: every command gets them."""
    from convify import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="convify",
        description="Rewrite PyTorch CNNs into all-convolutional networks: max pooling becomes strided "
                    "convolution, Linear heads become convolutions.",
        epilog="exit codes: 0 success, 1 a failed rewrite or verification, 2 bad usage or unreadable input",
    )
    parser.add_argument("--version", action="version", version=f"convify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedParser)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
        if command.add_arguments is not None and (argv is None or command.name == _command_in(argv, commands)):
            command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _command_in(argv: Sequence[str], commands: Sequence[Command]) -> str | None:
    names = {c.name for c in commands}
    return next((a for a in argv if a in names), None)
