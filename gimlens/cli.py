"""The ``gimlens`` console script: one subcommand per module, loaded on demand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.

Example:
    >>> from gimlens.cli import build_parser
    >>> sorted(build_parser()._subparsers._group_actions[0].choices)
    ['discover', 'explain', 'layerwise']
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GimlensError

#: subcommand -> (module, one-line help)
COMMANDS = {
    "explain": ("gimlens.attribution.cli", "token attribution for one prompt (GIM by default)"),
    "discover": ("circuits.cli", "discover a circuit with edge attribution patching"),
    "layerwise": ("gimlens.layerwise.cli", "token-to-token flows inside layers (layer-wise IG)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gimlens", description="Faithful gradient-based interpretability for TransformerLens."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.set_defaults(_add=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Let the chosen subcommand add its own arguments, then parse for real.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(known._module)
    sub = parser._subparsers._group_actions[0].choices[known.command]
    module.add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except GimlensError as err:
        print(f"gimlens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
