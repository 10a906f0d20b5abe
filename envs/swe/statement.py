"""Issue-style problem statements written from the failures an injected bug causes, templated (no LLM).

A statement says what a user would report: the failing tests and their errors. It must not say where the
bug is, so errors are cleaned of source locations (`x.py:12`, `line 12`, `File "..."`, absolute paths,
`Class.method()` qualifiers, memory addresses) before they are shown; `leaks_location` is the check the
task factory runs on the result against the mutation it knows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ERROR_CHARS = 200
MAX_TESTS_SHOWN = 5


@dataclass(frozen=True)
class TestFailure:
    __test__ = False  # a Test* class that pytest must not collect where a test module imports it

    test_id: str  # "tests/test_x.py::TestA::test_b[param]"
    error: str  # one short line, e.g. "AssertionError: assert 3 == 4"; "" when the log does not say


# ---------------------------------------------------------------------------------------------------------
# Reading a `pytest -rA` log


_SECTION = re.compile(r"^_{3,} (.+?) _{3,}$")  # "____ TestA.test_b[param] ____" opens a failure's report
_RULE = re.compile(r"^={3,} .* ={3,}$")  # "==== short test summary info ====" closes the last one
_E_LINE = re.compile(r"^E(?: +(.*))?$")
_SECTION_PREFIXES = ("ERROR at setup of ", "ERROR at teardown of ", "ERROR collecting ")


def failures_from_pytest_log(log: str, failing: Sequence[str]) -> list[TestFailure]:
    """One `TestFailure` per id of `failing`, in that order, with the error `pytest -rA` printed for it.

    The error is the first line of the last block of `E` lines in the test's report (the exception that
    ended it; the summary line is often cut at the terminal's width), else the message of its
    `FAILED id - message` / `ERROR id - message` summary line, else "".
    """
    lines = log.splitlines()
    summary = _summary_messages(lines, failing)
    sections = _sections(lines)
    failures = []
    for test_id in failing:
        error = _one_line(_raised(_section_of(test_id, sections)) or summary.get(test_id, ""))
        if error.startswith("assert "):  # a rewritten assert is reported without the exception's name
            error = f"AssertionError: {error}"
        failures.append(TestFailure(test_id, error))
    return failures


def _summary_messages(lines: Sequence[str], failing: Sequence[str]) -> dict[str, str]:
    messages: dict[str, str] = {}
    for line in lines:
        outcome, _, rest = line.partition(" ")
        if outcome not in ("FAILED", "ERROR"):
            continue
        for test_id in failing:  # ids may hold spaces and " - ", so match the known ids, not a pattern
            if test_id not in messages and (rest == test_id or rest.startswith(test_id + " - ")):
                messages[test_id] = rest[len(test_id) + 3:]
    return messages


def _sections(lines: Sequence[str]) -> list[tuple[str, list[str]]]:
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if head := _SECTION.match(line):
            title = head.group(1)
            for prefix in _SECTION_PREFIXES:
                title = title.removeprefix(prefix)
            sections.append((title, []))
        elif _RULE.match(line) and sections:
            sections.append(("", []))  # a closed section that no test matches
        elif sections:
            sections[-1][1].append(line)
    return sections


def _section_of(test_id: str, sections: Sequence[tuple[str, list[str]]]) -> list[str]:
    """The report lines of a test. Reports are headed `TestA.test_b[param]` without the file, so when two
    files have a test of that name the one whose report mentions the test's file wins."""
    base, bracket, param = test_id.partition("[")
    path, *names = base.split("::")
    title = ".".join(names) + bracket + param if names else test_id
    matching = [body for head, body in sections if head == title]
    in_file = [body for body in matching if any(path in line for line in body)]
    return (in_file or matching or [[]])[0]


def _raised(report: Sequence[str]) -> str:
    blocks: list[list[str]] = []
    previous_was_e = False
    for line in report:
        e_line = _E_LINE.match(line)
        if e_line and not previous_was_e:
            blocks.append([])
        if e_line:
            blocks[-1].append(e_line.group(1) or "")
        previous_was_e = e_line is not None
    return next((line for line in blocks[-1] if line.strip()), "") if blocks else ""


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3].rstrip() + "..."


# ---------------------------------------------------------------------------------------------------------
# Writing the statement


_LOCATIONS = (
    re.compile(r'File "[^"]*"(?:, line \d+)?(?:, in [\w<>.]+)?'),  # traceback frames
    re.compile(r"[\w./\\<>-]*\.pyw?\b(?::\d+)*"),  # any .py path, with its :line[:col]
    re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/](?:[^\s\\/:'\"]+[\\/])+[^\s\\/:'\"]*"),  # absolute paths
    re.compile(r"\blines? \d+", re.IGNORECASE),
    re.compile(r" at 0x[0-9a-fA-F]+"),  # object reprs: not locations, but they change between runs
    re.compile(r"Traceback \(most recent call last\):?"),  # a traceback quoted in a message
)
# Python 3.10+ names the method in TypeErrors ("Query.test() takes 2 positional arguments..."); keep `test()`.
_QUALIFIED_CALL = re.compile(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*\(\))")


def sanitize_error(error: str) -> str:
    """The error with its source locations removed, on one line."""
    for pattern in _LOCATIONS:
        error = pattern.sub("", error)
    error = _QUALIFIED_CALL.sub(r"\1", error)
    error = re.sub(r"\s\(\s*\)", "", error)  # "(/repo/x.py:3)" leaves "()"
    error = re.sub(r"\s+(?:at|in|from)\s*(?=[,;)]|$)", "", error)  # "failed at x.py:3" leaves "at"
    return " ".join(error.split()).strip(" ,;:-")


@dataclass(frozen=True)
class _Template:
    title: str  # format fields: test, kind, tests_fail(_capitalized), in_project, the_project
    intro: str
    seen: str  # heading of the list of failures
    expected: str  # heading and text of the expectation


_TEMPLATES = (
    _Template("`{test}` fails with {kind}",
              "After updating {the_project}, {tests_fail} that used to pass.",
              "### What I see",
              "### Expected\n\nAll of these tests pass, as they did before."),
    _Template("Test suite fails with {kind}{in_project}",
              "Running the test suite{in_project} shows a regression: {tests_fail}.",
              "**Failing tests**",
              "**Expected behaviour**\n\nThe tests pass; nothing they check was changed on purpose."),
    _Template("Regression: {tests_fail}{in_project}",
              "Something broke recently. {tests_fail_capitalized} with the errors below.",
              "Observed:",
              "Expected: every test listed above passes."),
)


def problem_statement(failures: Sequence[TestFailure], seed: int, repo_name: str = "") -> str:
    """An issue text for the failures: a title, what is seen (up to MAX_TESTS_SHOWN tests with their
    sanitized errors) and what is expected. The template is picked by `seed`; same inputs, same text."""
    if not failures:
        raise ValueError("a problem statement needs at least one failing test")
    template = random.Random(seed).choice(_TEMPLATES)
    errors = [sanitize_error(failure.error) for failure in failures]
    kinds = [kind for kind in map(_error_kind, errors) if kind]
    count = len(failures)
    tests_fail = "1 test fails" if count == 1 else f"{count} tests fail"
    fields = {
        "test": failures[0].test_id.split("::")[-1],
        "kind": kinds[0] if kinds else "an error",
        "tests_fail": tests_fail,
        "tests_fail_capitalized": tests_fail[0].upper() + tests_fail[1:],
        "in_project": f" in {repo_name}" if repo_name else "",
        "the_project": repo_name or "the project",
    }
    listing = [f"- `{failure.test_id}`" + (f": `{error}`" if error else "")
               for failure, error in zip(failures[:MAX_TESTS_SHOWN], errors)]
    if count > MAX_TESTS_SHOWN:
        more = count - MAX_TESTS_SHOWN
        listing.append(f"- ... and {more} more failing test{'s' if more > 1 else ''}")
    title, intro, seen, expected = (text.format(**fields) for text in
                                    (template.title, template.intro, template.seen, template.expected))
    return "\n\n".join([title, intro, seen, "\n".join(listing), expected]) + "\n"


def _error_kind(error: str) -> str:
    """`TypeError` of "TypeError: ..." or of a bare "TypeError"; the last part of a dotted name
    (`_pytest.outcomes.Failed`); "" when the error does not start with a class name."""
    match = re.match(r"([A-Za-z_][\w.]*)(?::|$)", error)
    kind = match.group(1).rsplit(".", 1)[-1] if match else ""
    return kind if kind[:1].isupper() else ""


def leaks_location(statement: str, mutation_path: str, lineno: int, function: str) -> bool:
    """Whether the statement gives away where the bug is: the mutated file's path or basename (as a whole
    name: `test_queries.py` does not leak `queries.py`), a `:<lineno>` or `line <lineno>` reference, or the
    function as a qualified `Class.method` (a bare name may be part of a test's name and is allowed)."""
    path = mutation_path.replace("\\", "/")
    basename = path.rsplit("/", 1)[-1]
    parts = function.split(".")
    qualified = [".".join(parts[-k:]) for k in range(2, len(parts) + 1)]
    patterns = [rf"(?<![\w-]){re.escape(name)}(?!\w)" for name in (path, basename)]
    patterns += [rf":{lineno}(?!\d)", rf"(?i:\bline\s+){lineno}(?!\d)"]
    patterns += [rf"(?<!\w){re.escape(name)}(?!\w)" for name in qualified]
    return any(re.search(pattern, statement) for pattern in patterns)
