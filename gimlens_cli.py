"""The `gimlens` console script: dispatch to the subcommands of both apps, loaded on demand.

This module sits above both packages: `gimlens explain` and `gimlens layerwise` are the token
attribution apps of `gimlens`, `gimlens discover` is `circuits`. Neither package imports it,
so the kernel never reaches up into an app. Each subcommand module defines
`add_arguments(parser)` and `run(args) -> int`; only the chosen one is imported, and the command
line is parsed once. `python -m gimlens_cli ...` (e.g. under `torchrun -m`) is the same as
`gimlens ...`.

Examples:
    >>> build_parser("explain").parse_args(["explain", "Hello", "-o", "a.json"]).output
    'a.json'
    >>> sorted(COMMANDS)
    ['discover', 'explain', 'layerwise']
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Callable

from gimlens.errors import GimlensError

__all__ = ["COMMANDS", "build_parser", "main"]


def _explain() -> ModuleType:
    from gimlens.attribution import cli

    return cli


def _layerwise() -> ModuleType:
    from gimlens.layerwise import cli

    return cli


def _discover() -> ModuleType:
    from circuits import cli

    return cli


#: subcommand -> (loader of its module, one-line help)
COMMANDS: dict[str, tuple[Callable[[], ModuleType], str]] = {
    "explain": (_explain, "token attribution for one prompt (GIM by default)"),
    "discover": (_discover, "discover a circuit with edge attribution patching"),
    "layerwise": (_layerwise, "token-to-token flows inside layers (layer-wise IG)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `command` (one of `COMMANDS`) added, if given."""
    parser = argparse.ArgumentParser(
        prog="gimlens", description="Faithful gradient-based interpretability for TransformerLens."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (load, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            load().add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `gimlens <command> ...`; returns the exit status (2 for a
    [`GimlensError`][gimlens.errors.GimlensError], printed as one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # the subcommand is the first word that is not an option (the top level takes only -h)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    module = COMMANDS[args.command][0]()
    try:
        return int(module.run(args) or 0)
    except GimlensError as err:
        print(f"gimlens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
