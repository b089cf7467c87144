"""Griffe extension for the API reference: render ``Example:`` sections as code examples.

The codebase's docstrings head their doctests with ``Example:`` (singular); Griffe's Google parser
only treats ``Examples:`` as an examples section and renders ``Example:`` as a Markdown admonition,
where ``x[:2]`` would be read as a link. This renames the heading before parsing, for every object
of a loaded package (the package itself included).
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _rename(obj: griffe.Object, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.docstring is not None:
        obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _rename(member, seen)


class ExampleSections(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        _rename(pkg, set())
