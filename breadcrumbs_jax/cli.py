"""The `breadcrumbs-jax` command line: one subcommand per module in COMMANDS.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (taking the parsed args, returning an exit code). Exit codes: 0 success,
1 runtime failure, 2 bad input (config, arguments, checkpoints).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MergeError

COMMANDS: tuple[str, ...] = ("breadcrumbs_jax.commands.demo",)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="breadcrumbs-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except MergeError as e:
        print(f"breadcrumbs-jax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
