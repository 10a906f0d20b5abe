"""grade_answer: exact and numeric matching."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from m2rl.rewards.answer import grade_answer, normalize_answer, parse_number
from m2rl.rewards.grading import grade_answer as grade_answer_from_grading


@pytest.mark.parametrize(
    "expected, given, ok",
    [
        ("42", "42", True),
        ("42", " 42 ", True),
        ("42", "42.0", True),
        ("42", "$\\boxed{42}$", True),
        ("1234", "1,234", True),
        ("0.75", "3/4", True),
        ("1e-3", "0.001", True),
        ("42", "43", False),
        ("42", "", False),
        ("42", None, False),
        ("Paris", "paris.", True),
        ("New  York", "new york", True),
        ("Paris", "London", False),
        ("3/0", "3/0", True),  # not a number: compared as strings
        ("abc", "'abc'", True),
    ],
)
def test_cases(expected, given, ok):
    assert grade_answer(expected, given) is ok


def test_tolerance_is_absolute_near_zero_and_relative_for_large_values():
    assert grade_answer("0", "0.0009", numeric_tolerance=1e-3)
    assert not grade_answer("0", "0.0011", numeric_tolerance=1e-3)
    assert grade_answer("1000000", "1000900.5", numeric_tolerance=1e-3)
    assert not grade_answer("1000000", "1001100.5", numeric_tolerance=1e-3)
    assert not grade_answer("1000000", "1000001", numeric_tolerance=1e-3)  # two integers: exact
    assert not grade_answer("0.1", "0.1000001", numeric_tolerance=0.0)
    assert grade_answer("0.1", "1/10", numeric_tolerance=0.0)  # exact rational arithmetic


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="numeric_tolerance"):
        grade_answer("1", "1", numeric_tolerance=-1)
    with pytest.raises(TypeError, match="expected"):
        grade_answer(1, "1")  # type: ignore[arg-type]


def test_parse_number_and_normalize():
    assert parse_number("-3.5") == -3.5
    assert parse_number("x") is None
    assert normalize_answer("  $\\boxed{ A  B }$ ") == "a b"
    assert grade_answer_from_grading is grade_answer


@given(st.integers(-(10**9), 10**9))
def test_integers_match_themselves_in_any_rendering(n):
    assert grade_answer(str(n), f"{n}.0")
    assert grade_answer(str(n), f"{n:,}")
    assert not grade_answer(str(n), str(n + 1))
