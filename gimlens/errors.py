"""The one exception type of gimlens (and circuits)."""


class GimlensError(ValueError):
    """Raised for bad input: says what was wrong and what is expected.

    Subclasses `ValueError` so generic `except ValueError` handlers keep working.
    """
