"""The `breadcrumbs-jax` command line: one subcommand per module in COMMANDS.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (taking the parsed args, returning an exit code). Exit codes: 0 success,
1 runtime failure, 2 bad input (config, arguments, checkpoints), 130 interrupted. Errors
are one line on stderr; BREADCRUMBS_DEBUG=1 shows the traceback of a failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import MergeError

COMMANDS: tuple[str, ...] = (
    "breadcrumbs_jax.commands.demo",
    "breadcrumbs_jax.commands.merge",
    "breadcrumbs_jax.commands.inspect",
)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="breadcrumbs-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's informational warnings
    try:
        return int(args.func(args) or EXIT_OK)
    except MergeError as e:
        print(f"breadcrumbs-jax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("breadcrumbs-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # one line for scripts; the traceback on request
        if os.environ.get("BREADCRUMBS_DEBUG"):
            raise
        print(f"breadcrumbs-jax: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
