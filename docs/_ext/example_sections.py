"""Griffe extension for the API reference: render ``Example:`` sections as code examples.

The codebase's docstrings head their doctests with ``Example:`` (singular); Griffe's Google parser
only treats ``Examples:`` as an examples section and renders ``Example:`` as a Markdown admonition,
where ``x[:2]`` would be read as a link. This renames the heading before parsing.
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
