"""Exact / numeric answer matching for tasks whose outcome is a submitted answer string."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


def normalize_answer(text: str) -> str:
    """Strip the wrappers models put around answers: whitespace, quotes, $..$, \\boxed{..},
    a trailing period; collapse inner whitespace; case-fold."""
    s = text.strip()
    for _ in range(3):  # wrappers nest, e.g. $\boxed{42}$.
        before = s
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`$":
            s = s[1:-1].strip()
        m = _BOXED.match(s)
        if m:
            s = m.group(1).strip()
        if s.endswith(".") and not _NUMBER.match(s):
            s = s[:-1].strip()
        if s == before:
            break
    return " ".join(s.split()).casefold()


def parse_number(text: str) -> Fraction | None:
    """'42', '-3.5', '1e-3', '1,234.5', '3/4' -> exact Fraction; anything else -> None."""
    s = normalize_answer(text)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _NUMBER.match(s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    if s.count("/") == 1:
        num, den = (part.strip() for part in s.split("/"))
        if re.fullmatch(r"[+-]?\d+", num) and re.fullmatch(r"\d+", den) and int(den) != 0:
            return Fraction(int(num), int(den))
    return None


def grade_answer(expected: str, given: str | None, numeric_tolerance: float = 1e-6) -> bool:
    """True if `given` matches `expected`: numerically when both are numbers (two integral values
    must be equal; otherwise |given - expected| <= tol * max(1, |expected|): absolute near zero,
    relative for large values),
    otherwise as normalized strings. An empty or missing answer never matches."""
    if not isinstance(expected, str):
        raise TypeError(f"grade_answer: expected must be a string, got {type(expected).__name__}")
    if not (
        isinstance(numeric_tolerance, (int, float))
        and math.isfinite(numeric_tolerance)
        and numeric_tolerance >= 0
    ):
        raise ValueError(
            f"grade_answer: numeric_tolerance must be a finite number >= 0, got {numeric_tolerance!r}"
        )
    if given is None or not str(given).strip():
        return False
    given = str(given)
    e_num, g_num = parse_number(expected), parse_number(given)
    if e_num is not None and g_num is not None:
        if e_num.denominator == 1 and g_num.denominator == 1:
            return e_num == g_num  # counts and indices: off by one is wrong however large the value
        return abs(float(g_num - e_num)) <= numeric_tolerance * max(1.0, abs(float(e_num)))
    return normalize_answer(expected) == normalize_answer(given)
