"""The `latentflow` command: one subcommand per module in `latentflow.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed namespace.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from latentflow.errors import LatentflowError, user_message

COMMAND_MODULES = ("toy", "encode", "train", "plot_log", "export", "sample", "fid_stats", "evaluate", "plot_eval",
                   "demo", "reflow", "ot_fit")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="latentflow", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"latentflow.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, and turn user errors into one-line messages."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = ["latentflow", *argv]  # what ran, also when called in-process; stored in manifests
    try:
        result = args.func(args)
    except (LatentflowError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        print(f"latentflow {args.command}: error: {user_message(error)}", file=sys.stderr)  # OS errors name the path
        return 2
    except KeyboardInterrupt:
        print(f"latentflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
