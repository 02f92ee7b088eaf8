"""The argument checks every part of gce shares: an int >= a minimum, a number >= a minimum, never a bool.

``is_int``/``is_number`` answer; ``check_int``/``check_number`` raise a ValueError that names the field.
"""

from __future__ import annotations

import math

__all__ = ["check_int", "check_number", "is_int", "is_number"]


def is_int(value: object, minimum: int | None = 1) -> bool:
    """An int (not a bool) >= ``minimum``; any integer when ``minimum`` is None."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_number(value: object, minimum: float = -math.inf, *, allow_inf: bool = False) -> bool:
    """An int or float (not a bool, not NaN: NaN >= anything is False) >= ``minimum``, finite unless ``allow_inf``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum
    return ok and (allow_inf or math.isfinite(value))


def check_int(field: str, value: object, minimum: int = 1, *, optional: bool = False) -> None:
    """Raise unless ``value`` is an integer >= ``minimum`` (or None, when ``optional``)."""
    if not (is_int(value, minimum) or (optional and value is None)):
        raise ValueError(f"{field} must be {'None or ' if optional else ''}an integer >= {minimum}; got {value!r}")


def check_number(field: str, value: object, *, minimum: float = 0.0, allow_inf: bool = False) -> None:
    """Raise unless ``value`` is a number >= ``minimum``, finite unless ``allow_inf``."""
    if not is_number(value, minimum, allow_inf=allow_inf):
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{field} must be {kind} >= {minimum}; got {value!r}")
