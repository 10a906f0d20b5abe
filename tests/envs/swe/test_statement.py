"""Problem statements: errors read from a real-shaped `pytest -rA` log, issue text that never points at the
mutated file, line or function, and the leak check itself."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.envs.swe.statement import (
    MAX_ERROR_CHARS,
    TestFailure,
    failures_from_pytest_log,
    leaks_location,
    problem_statement,
    sanitize_error,
)

# The mutation behind the log: `tinydb/queries.py`, line 9, in `Query.__eq__`.
PATH, LINENO, FUNCTION = "tinydb/queries.py", 9, "Query.__eq__"

# Recorded from pytest 9 (paths rewritten to /repo), with two more failures added: one whose message names the
# source location (as a wrapped subprocess or a logging handler would) and two tests of the same name.
LOG = """\
============================= test session starts ==============================
platform linux -- Python 3.11.7, pytest-9.2.0, pluggy-1.7.0
rootdir: /repo
collected 7 items

tests/test_queries.py FF.EF                                              [ 71%]
tests/test_a.py F                                                        [ 85%]
tests/test_b.py F                                                        [100%]

==================================== ERRORS ====================================
____________________ ERROR at setup of test_json_roundtrip _____________________

tmp_path = PosixPath('/tmp/pytest-of-root/pytest-219/test_json_roundtrip0')

    @pytest.fixture
    def db(tmp_path):
>       raise OSError("[Errno 2] No such file or directory: '/repo/tinydb/storages.py'")
E       OSError: [Errno 2] No such file or directory: '/repo/tinydb/storages.py'

tests/test_queries.py:21: OSError
=================================== FAILURES ===================================
_____________________________ TestQuery.test_eq[3] _____________________________

self = <test_queries.TestQuery object at 0x7fab0253da50>, value = 3

    @pytest.mark.parametrize("value", [3])
    def test_eq(self, value):
>       assert add(1, 2) == value + 1 - 1
E       assert 4 == ((3 + 1) - 1)
E        +  where 4 = add(1, 2)

tests/test_queries.py:8: AssertionError
_________________________________ test_search __________________________________

    def test_search():
>       Query() == "john"

tests/test_queries.py:12: 
_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ 

self = <tinydb.queries.Query object at 0x7fab0253d510>, other = 'john'

    def __eq__(self, other):
>       return self._generate_test(lambda value: value == other, ("==", self._path, other))
               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
E       TypeError: Query._generate_test() takes 2 positional arguments but 3 were given

tinydb/queries.py:9: TypeError
_________________________________ test_worker __________________________________

    def test_worker():
>       run_worker()

tests/test_queries.py:30: 
_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ 

    def run_worker():
        try:
>           worker.join()
E           ValueError: invalid query

tinydb/worker.py:40: ValueError

During handling of the above exception, another exception occurred:

    def run_worker():
>       raise RuntimeError(f"worker failed:\\n{traceback.format_exc()}")
E       RuntimeError: failed:   File "/repo/tinydb/queries.py", line 9, in __eq__ at tinydb/queries.py:9
E         more detail

tinydb/worker.py:43: RuntimeError
__________________________________ test_same ___________________________________

    def test_same():
>       assert sorted([2, 1]) == [2, 1]
E       AssertionError: assert [1, 2] == [2, 1]

tests/test_b.py:3: AssertionError
__________________________________ test_same ___________________________________

    def test_same():
>       assert len("ab") == 3
E       AssertionError: assert 2 == 3

tests/test_a.py:3: AssertionError
==================================== PASSES ====================================
=========================== short test summary info ============================
PASSED tests/test_queries.py::test_ok
ERROR tests/test_queries.py::test_json_roundtrip - OSError: [Errno 2] No such...
FAILED tests/test_queries.py::TestQuery::test_eq[3] - assert 4 == ((3 + 1) - 1)
FAILED tests/test_queries.py::test_search - TypeError: Query._generate_test()...
FAILED tests/test_queries.py::test_worker - RuntimeError: failed:
FAILED tests/test_a.py::test_same - AssertionError: assert 2 == 3
FAILED tests/test_b.py::test_same - AssertionError: assert [1, 2] == [2, 1]
FAILED tests/test_queries.py::test_summary_only - KeyError: 'name'
=================== 7 failed, 1 passed, 1 error in 1.23s =====================
"""

FAILING = [
    "tests/test_queries.py::TestQuery::test_eq[3]",
    "tests/test_queries.py::test_search",
    "tests/test_queries.py::test_json_roundtrip",
    "tests/test_queries.py::test_worker",
    "tests/test_a.py::test_same",
    "tests/test_b.py::test_same",
    "tests/test_queries.py::test_summary_only",
    "tests/test_queries.py::test_not_in_the_log",
]


def test_failures_from_a_pytest_log() -> None:
    assert failures_from_pytest_log(LOG, FAILING) == [
        # a rewritten assert gets the exception's name back
        TestFailure(FAILING[0], "AssertionError: assert 4 == ((3 + 1) - 1)"),
        # the E line, not the summary line pytest cut at the terminal's width
        TestFailure(FAILING[1], "TypeError: Query._generate_test() takes 2 positional arguments but 3 were "
                                "given"),
        TestFailure(FAILING[2], "OSError: [Errno 2] No such file or directory: '/repo/tinydb/storages.py'"),
        # the exception that ended the test (the last E block), whitespace-collapsed
        TestFailure(FAILING[3], 'RuntimeError: failed: File "/repo/tinydb/queries.py", line 9, in __eq__ at '
                                "tinydb/queries.py:9"),
        # two reports are headed `test_same`: each test gets the one that names its file
        TestFailure(FAILING[4], "AssertionError: assert 2 == 3"),
        TestFailure(FAILING[5], "AssertionError: assert [1, 2] == [2, 1]"),
        TestFailure(FAILING[6], "KeyError: 'name'"),  # no report (--tb=no): the summary's message
        TestFailure(FAILING[7], ""),
    ]


def test_long_errors_are_cut() -> None:
    log = f"FAILED tests/test_x.py::test_long - ValueError: {'x ' * 300}\n"
    (failure,) = failures_from_pytest_log(log, ["tests/test_x.py::test_long"])
    assert len(failure.error) <= MAX_ERROR_CHARS and failure.error.startswith("ValueError: x x")
    assert failure.error.endswith("...")


def test_sanitize_error_removes_locations() -> None:
    assert sanitize_error('RuntimeError: Traceback (most recent call last): File "/repo/tinydb/queries.py", '
                          "line 9, in __eq__ here") == "RuntimeError: here"
    assert sanitize_error("ValueError: bad (tinydb/queries.py:9:4)") == "ValueError: bad"
    assert sanitize_error("OSError: No such file: '/srv/data/db.json'") == "OSError: No such file: ''"
    assert sanitize_error("SyntaxError: invalid syntax at line 9") == "SyntaxError: invalid syntax"
    assert sanitize_error("TypeError: Query._generate_test() takes 2 positional arguments") == (
        "TypeError: _generate_test() takes 2 positional arguments")
    assert sanitize_error("AssertionError: assert <Query object at 0x7fab0253da50> == 3") == (
        "AssertionError: assert <Query object> == 3")
    # operators and numbers that are not locations stay
    assert sanitize_error("TypeError: unsupported operand type(s) for /: 'int' and 'str'") == (
        "TypeError: unsupported operand type(s) for /: 'int' and 'str'")
    assert sanitize_error("AssertionError: assert 4 == ((3 + 1) - 1)") == (
        "AssertionError: assert 4 == ((3 + 1) - 1)")


def test_statement_from_the_log_does_not_leak_the_location() -> None:
    failures = failures_from_pytest_log(LOG, FAILING)
    for seed in range(6):
        text = problem_statement(failures, seed, repo_name="tinydb")
        assert not leaks_location(text, PATH, LINENO, FUNCTION), text
        for fragment in ("/repo", "tinydb/", "storages.py", "line 9", ":9", "0x7f", 'File "'):
            assert fragment not in text, (fragment, text)


def test_statement_golden() -> None:
    failures = failures_from_pytest_log(LOG, FAILING[:2])
    assert problem_statement(failures, seed=0, repo_name="tinydb") == problem_statement(failures, 0, "tinydb")
    texts = {problem_statement(failures, seed, repo_name="tinydb") for seed in range(12)}
    assert len(texts) == 3  # every template is used
    assert (
        "Test suite fails with AssertionError in tinydb\n"
        "\n"
        "Running the test suite in tinydb shows a regression: 2 tests fail.\n"
        "\n"
        "**Failing tests**\n"
        "\n"
        "- `tests/test_queries.py::TestQuery::test_eq[3]`: `AssertionError: assert 4 == ((3 + 1) - 1)`\n"
        "- `tests/test_queries.py::test_search`: "
        "`TypeError: _generate_test() takes 2 positional arguments but 3 were given`\n"
        "\n"
        "**Expected behaviour**\n"
        "\n"
        "The tests pass; nothing they check was changed on purpose.\n"
    ) in texts


def test_statement_lists_at_most_five_tests_and_counts_the_rest() -> None:
    failures = [TestFailure(f"tests/test_x.py::test_{i}", "") for i in range(8)]
    text = problem_statement(failures, seed=1)
    assert [f"test_{i}`" in text for i in range(8)] == [True] * 5 + [False] * 3
    assert "and 3 more failing tests" in text and "8 tests fail" in text
    assert "`: `" not in text  # no error to show, no empty code span
    with pytest.raises(ValueError):
        problem_statement([], seed=0)


def test_leaks_location() -> None:
    def leaks(text: str) -> bool:
        return leaks_location(text, PATH, LINENO, FUNCTION)

    for leaking in ["see tinydb/queries.py", "in queries.py", "queries.py:9", "error at :9", "on line 9",
                    "Line  9 fails", "Query.__eq__ is wrong", "tinydb.queries.Query.__eq__()"]:
        assert leaks(leaking), leaking
    for fine in ["tests/test_queries.py::test_eq fails", "my_queries.py", "queries.pyc", ":90", "line 19",
                 "lines 9a", "__eq__ returns a bool", "Query.__eq__x", "assert 9 == 10", "KeyError: 9"]:
        assert not leaks(fine), fine
    assert leaks_location("in Outer.Inner.method", "a.py", 1, "Outer.Inner.method")
    assert leaks_location("in Inner.method", "a.py", 1, "Outer.Inner.method")
    assert not leaks_location("helper() failed", "a.py", 1, "helper")  # a bare name is allowed


_WORDS = st.text(st.sampled_from("abcdefgh ="), max_size=20)


@settings(max_examples=100, deadline=None)
@given(_WORDS, _WORDS, st.integers(1, 5000), st.sampled_from(["pkg/mod.py", "src/pkg/sub/mod.py", "mod.py"]))
def test_any_location_in_an_error_is_removed(before: str, after: str, lineno: int, path: str) -> None:
    error = (f'ValueError: {before} File "/repo/{path}", line {lineno}, in f {after} /repo/{path}:{lineno} '
             f"{path}:{lineno}:3 line {lineno} {before}")
    failures = [TestFailure("tests/test_mod.py::test_f", error)]
    text = problem_statement(failures, seed=lineno)
    assert not leaks_location(text, path, lineno, "Mod.f"), text
