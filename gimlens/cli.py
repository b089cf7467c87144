"""The `gimlens` console script: one subcommand per module, loaded on demand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Only the chosen
subcommand's module is imported, and the command line is parsed once.

Examples:
    >>> from gimlens.cli import build_parser
    >>> build_parser("explain").parse_args(["explain", "Hello", "-o", "a.json"]).output
    'a.json'
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GimlensError

__all__ = ["COMMANDS", "build_parser", "main"]

#: subcommand -> (module, one-line help)
COMMANDS = {
    "explain": ("gimlens.attribution.cli", "token attribution for one prompt (GIM by default)"),
    "discover": ("circuits.cli", "discover a circuit with edge attribution patching"),
    "layerwise": ("gimlens.layerwise.cli", "token-to-token flows inside layers (layer-wise IG)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `command` (one of `COMMANDS`) added, if given."""
    parser = argparse.ArgumentParser(
        prog="gimlens", description="Faithful gradient-based interpretability for TransformerLens."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the subcommand is the first word that is not an option (the top level takes only -h)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except GimlensError as err:
        print(f"gimlens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
