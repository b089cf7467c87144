"""Validation of scalar arguments at the boundary, with one wording for both packages.

- [`check_int`][gimlens.validation.check_int]: an integer within bounds (never a `bool`), or a
  [`GimlensError`][gimlens.errors.GimlensError] saying `"<name> must be an int >= 1, got 0"`;
- [`coerce_enum`][gimlens.validation.coerce_enum]: a member of an `Enum` from the member or its
  value, or `"unknown <what> 'x'; expected one of 'a', 'b'"`.

Every int and string->enum argument of `gimlens` and `circuits` goes through these two, so the
messages a user meets read the same everywhere.

Examples:
    >>> from gimlens.quadrature import Quadrature
    >>> check_int("steps", 8, minimum=1), coerce_enum(Quadrature, "trapezoid", "quadrature rule").name
    (8, 'TRAPEZOID')
    >>> check_int("steps", 0, minimum=1)
    Traceback (most recent call last):
    ...
    gimlens.errors.GimlensError: steps must be an int >= 1, got 0
"""

from __future__ import annotations

import enum
import numbers
from typing import Any, TypeVar

from .errors import GimlensError

__all__ = ["check_int", "coerce_enum", "int_rule"]

E = TypeVar("E", bound=enum.Enum)


def int_rule(minimum: int | None = None, maximum: int | None = None, *, allow_none: bool = False) -> str:
    """What [`check_int`][gimlens.validation.check_int] expects, in words (for messages and help).

    Examples:
        >>> int_rule(1), int_rule(0, 9), int_rule(allow_none=True)
        ('an int >= 1', 'an int in [0, 9]', 'an int or None')
    """
    if minimum is not None and maximum is not None:
        rule = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        rule = f"an int >= {minimum}"
    elif maximum is not None:
        rule = f"an int <= {maximum}"
    else:
        rule = "an int"
    return rule + (" or None" if allow_none else "")


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False, note: str = "") -> Any:
    """`value` as an `int` within `[minimum, maximum]` (bounds included; `None`: unbounded), else a
    [`GimlensError`][gimlens.errors.GimlensError] naming `name`, the rule and the value.

    Args:
        name: the argument, as the user wrote it (`"batch_size"`, `"--steps"`).
        value: what was passed; any integral number but a `bool` (numpy integers too).
        minimum: the smallest value allowed.
        maximum: the largest value allowed.
        allow_none: `None` passes through unchanged.
        note: words after the rule, e.g. `"the graph's valid edges"`.

    Returns:
        `int(value)`, or `None` when `allow_none` and `value` is `None`.

    Examples:
        >>> check_int("batch_size", None, minimum=1, allow_none=True) is None
        True
        >>> check_int("n", 7, minimum=0, maximum=5, note="the graph's valid edges")
        Traceback (most recent call last):
        ...
        gimlens.errors.GimlensError: n must be an int in [0, 5] (the graph's valid edges), got 7
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return int(value)
    note = f" ({note})" if note else ""
    raise GimlensError(f"{name} must be {int_rule(minimum, maximum, allow_none=allow_none)}{note}, got {value!r}")


def coerce_enum(cls: type[E], value: Any, what: str) -> E:
    """`value` as a member of the enum `cls` (a member, or a member's value), else a
    [`GimlensError`][gimlens.errors.GimlensError] naming `what` and the known values.

    Examples:
        >>> from gimlens.quadrature import Quadrature
        >>> coerce_enum(Quadrature, "trapezoid", "quadrature rule").name
        'TRAPEZOID'
        >>> coerce_enum(Quadrature, "simpson", "quadrature rule")
        Traceback (most recent call last):
        ...
        gimlens.errors.GimlensError: unknown quadrature rule 'simpson'; expected one of 'gauss_legendre', ...
    """
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except (ValueError, TypeError):
        known = ", ".join(repr(m.value) for m in cls)
        raise GimlensError(f"unknown {what} {value!r}; expected one of {known}") from None
