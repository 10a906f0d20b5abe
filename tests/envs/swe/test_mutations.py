"""Bug injection: golden edits for each operator, and the properties every mutation must have, checked on
generated functions and on real stdlib modules by oracles written independently of the module."""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
import tokenize
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.envs.swe.mutations import OPERATORS, Mutation, find_mutations, is_test_file, sample_mutations

PATH = "pkg/mod.py"


def mutated(source: str, operator: str) -> list[str]:
    return [m.mutated for m in find_mutations(PATH, source, [operator])]


# ---------------------------------------------------------------------------------------------------------
# Golden edits: the exact text each operator writes


def test_flip_comparison_golden() -> None:
    src = textwrap.dedent('''\
        def pick(items, key, limit, seen):
            # keep the small ones
            return [x for x in items if key(x) < limit and x is not None and x  not   in seen]
        ''')
    assert mutated(src, "flip_comparison") == [
        src.replace("key(x) < limit", "key(x) >= limit"),
        src.replace("key(x) < limit", "key(x) <= limit"),
        src.replace("x is not None", "x is None"),
        src.replace("x  not   in seen", "x  in seen"),  # only the token changes, not the spaces around it
    ]
    assert [m.description for m in find_mutations(PATH, src, ["flip_comparison"])] == [
        "flipped < to >=", "flipped < to <=", "flipped is not to is", "flipped not in to in"]


def test_flip_comparison_in_a_chain_changes_one_link() -> None:
    src = "def between(a, b, c):\n    return a < b <= c\n"
    assert mutated(src, "flip_comparison") == [
        "def between(a, b, c):\n    return a >= b <= c\n", "def between(a, b, c):\n    return a <= b <= c\n",
        "def between(a, b, c):\n    return a < b > c\n", "def between(a, b, c):\n    return a < b < c\n"]


def test_flip_operator_golden_keeps_precedence() -> None:
    src = textwrap.dedent('''\
        def mix(a, b, c):
            total = a + b * c  # weighted
            total -= a // 2
            label = "n=" + str(a) + "%d" % b
            return total ^ b & c or a
        ''')
    assert mutated(src, "flip_operator") == [
        src.replace("a + b * c", "a - b * c"),
        src.replace("a + b * c", "a + b / c"),
        src.replace("total -= a // 2", "total += a // 2"),
        src.replace("a // 2", "a / 2"),
        src.replace("total ^ b & c or a", "total ^ b & c and a"),
        src.replace("total ^ b & c", "total | b & c"),
        # `total ^ b | c` would regroup as (total ^ b) | c: the flipped node gets parentheses
        src.replace("total ^ b & c", "total ^ (b | c)"),
    ]  # string concatenation and %-formatting are left alone


def test_off_by_one_golden_only_where_counts_and_indexes_live() -> None:
    src = textwrap.dedent('''\
        def window(items, n):
            size = 3 * n  # not an index
            if len(items) > 0:
                return items[-1], items[len(items) - 2], items[1:n]
            for i in range(n - 1):
                size += 2
            return 0
        ''')
    assert mutated(src, "off_by_one") == [
        src.replace("len(items) > 0", "len(items) > 1"),
        src.replace("len(items) > 0", "len(items) > -1"),
        src.replace("items[-1]", "items[0]"),
        src.replace("items[-1]", "items[-2]"),
        src.replace("len(items) - 2", "len(items) - 3"),
        src.replace("len(items) - 2", "len(items) - 1"),
        src.replace("items[1:n]", "items[2:n]"),
        src.replace("items[1:n]", "items[0:n]"),
        src.replace("range(n - 1)", "range(n - 2)"),
        src.replace("range(n - 1)", "range(n - 0)"),
        src.replace("return 0", "return 1"),
        src.replace("return 0", "return -1"),
    ]


TALLY = textwrap.dedent('''\
    def tally(words):
        """Count words.

        Only non-empty ones.
        """
        counts = {}
        for word in words:
            if not word:
                continue  # skip blanks
            counts[word] = counts.get(word, 0) + 1
        return counts


    def single(x):
        return x
    ''')


def test_remove_statement_golden() -> None:
    lines = TALLY.splitlines(keepends=True)

    def without(first: int, last: int, replacement: str = "") -> str:  # 1-based, inclusive
        return "".join(lines[:first - 1]) + replacement + "".join(lines[last:])

    assert mutated(TALLY, "remove_statement") == [
        without(6, 6),  # counts = {}
        without(7, 10),  # the whole loop
        without(8, 9),  # the if inside it
        without(9, 9, "            pass\n"),  # the only statement of its block: `pass` keeps it valid
        without(10, 10),
        without(11, 11),
    ]  # never the docstring; `single` has one statement only


def test_swap_arguments_golden_keeps_comments_in_place() -> None:
    src = textwrap.dedent('''\
        def place(grid, x, y, rest):
            grid.put(x, y, *rest)
            return divmod(x, y) + pow(2, 2) + combine(
                left,  # first
                right,
            )
        ''')
    assert mutated(src, "swap_arguments") == [
        src.replace("grid.put(x, y, *rest)", "grid.put(y, x, *rest)"),  # never a starred argument
        src.replace("divmod(x, y)", "divmod(y, x)"),  # pow(2, 2): equal arguments, no change
        src.replace("left,  # first\n        right,", "right,  # first\n        left,"),
    ]


def test_change_return_golden() -> None:
    src = textwrap.dedent('''\
        def check(a, b):
            if a:
                return True
            if b is None:
                return b == a
            if not b:
                return not a
            if a > b:
                return isinstance(a, int)
            if a < 0:
                return
            if b < 0:
                return None
            return a + b
        ''')
    assert mutated(src, "change_return") == [
        src.replace("return True", "return False"),
        src.replace("return b == a", "return not (b == a)"),
        src.replace("return not a", "return a"),
        src.replace("return isinstance(a, int)", "return not isinstance(a, int)"),
        src.replace("return a + b", "return None"),
    ]


def test_invert_condition_golden() -> None:
    src = textwrap.dedent('''\
        def sign(x):
            while x is None:
                x = 0
            if x > 0:  # positive
                return 1
            elif not x:
                return 0
            return -1 if x < 0 else 0
        ''')
    assert mutated(src, "invert_condition") == [
        src.replace("while x is None:", "while not (x is None):"),
        src.replace("if x > 0:  # positive", "if not (x > 0):  # positive"),
        src.replace("elif not x:", "elif x:"),
        src.replace("-1 if x < 0 else 0", "-1 if not (x < 0) else 0"),
    ]


def test_columns_are_utf8_bytes_on_non_ascii_lines() -> None:
    src = 'def greet(name, n):\n    if name == "héllo wörld ✓" and n < 3:  # naïve\n        return n\n'
    assert mutated(src, "flip_comparison")[1:] == [
        src.replace("n < 3", "n >= 3"), src.replace("n < 3", "n <= 3")]
    assert mutated(src, "off_by_one") == [src.replace("n < 3", "n < 4"), src.replace("n < 3", "n < 2")]


def test_line_endings_and_a_byte_order_mark_are_kept() -> None:
    crlf = "def f(a, b):\r\n    return a < b  # c\r\n"
    assert mutated(crlf, "flip_comparison") == [crlf.replace("<", ">="), crlf.replace("<", "<=")]
    bom = "\ufeffdef f(a):\n    return a + 1\n"  # valid Python; ast.parse wants it as bytes then
    assert mutated(bom, "flip_operator") == [bom.replace("+", "-")]


def test_mutation_fields() -> None:
    src = "import os\n\n\nclass Query:\n    def __eq__(self, other):\n        return self.x == other\n"
    (mutation,) = find_mutations("tinydb/queries.py", src, ["flip_comparison"])
    assert mutation == Mutation(path="tinydb/queries.py", operator="flip_comparison", lineno=6,
                                function="Query.__eq__", description="flipped == to !=", original=src,
                                mutated=src.replace("self.x == other", "self.x != other"))


def test_nested_functions_are_named_and_mutated_on_their_own() -> None:
    src = "def outer(a):\n    def inner(b):\n        return b + 1\n    return inner(a) - 1\n"
    assert [(m.function, m.lineno) for m in find_mutations(PATH, src, ["flip_operator"])] == [
        ("outer", 4), ("outer.inner", 3)]


# ---------------------------------------------------------------------------------------------------------
# What is never mutated


TEST_PATHS = ["tests/test_x.py", "test/helpers.py", "pkg/tests/util.py", "pkg/test_queries.py",
              "pkg/queries_test.py", "conftest.py", "pkg/conftest.py"]


@pytest.mark.parametrize("path", TEST_PATHS)
def test_test_files_are_never_mutated(path: str) -> None:
    assert is_test_file(path)
    assert find_mutations(path, TALLY) == []


@pytest.mark.parametrize("path", ["pkg/testing.py", "pkg/contest.py", "latest/x.py", "tests.py",
                                  "pkg/mytest.py"])
def test_source_files_that_look_like_tests_are_mutated(path: str) -> None:
    assert not is_test_file(path)
    assert find_mutations(path, TALLY)


def test_module_level_code_and_definition_time_code_are_never_mutated() -> None:
    src = textwrap.dedent('''\
        LIMIT = 3 < 4 and len("ab") - 1
        if LIMIT:
            print(max(1, 2))


        @decorate(1 + 2)
        def f(a=1 < 2, b=[0][0]) -> int:
            x: list[1] = []
            return a
        ''')
    assert [(m.lineno, m.operator) for m in find_mutations(PATH, src)] == [
        (8, "remove_statement"), (9, "remove_statement"), (9, "change_return")]


def test_unparsable_sources_are_skipped() -> None:
    assert find_mutations(PATH, "def f(:\n    return 1\n") == []
    assert find_mutations(PATH, 'def f():\n    print "python 2"\n') == []
    assert sample_mutations({"bad.py": "def (", "good.py": TALLY}, seed=0, limit=3)


def test_unknown_operator_is_an_error() -> None:
    with pytest.raises(ValueError, match="shuffle_methods"):
        find_mutations(PATH, TALLY, ["shuffle_methods"])


# ---------------------------------------------------------------------------------------------------------
# Properties, checked by oracles that do not use the module's internals


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((prefix + node.name, node))
            found += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            found += _functions(node, f"{prefix}{node.name}.")
        else:
            found += _functions(node, prefix)
    return found


def _function_at(tree: ast.AST, name: str, lineno: int) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The function called `name` whose lines hold `lineno` (a name can be defined twice)."""
    return next(fn for qualname, fn in _functions(tree) if qualname == name
                and fn.end_lineno is not None and fn.lineno <= lineno <= fn.end_lineno)


@functools.cache
def _comments(source: str) -> Counter[str]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return Counter(t.string for t in tokens if t.type == tokenize.COMMENT)


def _docstrings(tree: ast.AST) -> list[str | None]:
    return [ast.get_docstring(node, clean=False) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]


_OPS = (ast.operator, ast.boolop, ast.cmpop, ast.unaryop)


def _shape(tree: ast.AST) -> list[str]:
    return [type(node).__name__ for node in ast.walk(tree) if not isinstance(node, _OPS)]


def _ops(tree: ast.AST) -> list[str]:
    return [type(node).__name__ for node in ast.walk(tree) if isinstance(node, _OPS)]


_parse = functools.cache(ast.parse)  # the original of every mutation of a file is the same text


def check(mutation: Mutation) -> None:
    """Every mutation parses, changes the AST of its function, leaves every line outside that function
    byte-identical and keeps comments and docstrings; operator flips keep the tree's shape (nothing
    regroups by precedence) and change exactly one operator."""
    after = ast.parse(mutation.mutated)
    old_lines = mutation.original.splitlines(keepends=True)
    new_lines = mutation.mutated.splitlines(keepends=True)
    old_fn = _function_at(_parse(mutation.original), mutation.function, mutation.lineno)  # cached
    first = min([old_fn.lineno] + [d.lineno for d in old_fn.decorator_list])
    after_end = len(new_lines) - (len(old_lines) - (old_fn.end_lineno or 0))
    assert old_lines[:first - 1] == new_lines[:first - 1]
    assert old_lines[old_fn.end_lineno:] == new_lines[after_end:]
    new_fn = _function_at(after, mutation.function, old_fn.lineno)  # the lines above it are unchanged
    assert ast.dump(old_fn) != ast.dump(new_fn)
    assert _docstrings(old_fn) == _docstrings(new_fn)
    if mutation.operator == "remove_statement":
        assert not _comments(mutation.mutated) - _comments(mutation.original)
    else:
        assert _comments(mutation.mutated) == _comments(mutation.original)
    if mutation.operator in ("flip_comparison", "flip_operator"):
        assert _shape(old_fn) == _shape(new_fn)
        assert sum(a != b for a, b in zip(_ops(old_fn), _ops(new_fn), strict=True)) == 1
    if mutation.operator == "swap_arguments":
        assert sorted(_shape(old_fn)) == sorted(_shape(new_fn))


def test_golden_snippets_pass_the_checks() -> None:
    for mutation in find_mutations(PATH, TALLY):
        check(mutation)


_STDLIB = {f"{module.__name__}.py": inspect.getsource(module) for module in (textwrap, shlex)}


@pytest.mark.parametrize("path", sorted(_STDLIB))
def test_stdlib_modules(path: str) -> None:
    mutations = find_mutations(path, _STDLIB[path])
    assert {m.operator for m in mutations} == set(OPERATORS)
    for mutation in mutations[::max(1, len(mutations) // 50)]:  # ~50 spread over the file keep this fast
        check(mutation)


# Generated modules: random expressions (parenthesized or not, so precedence matters), nested blocks,
# comments, one-liners, multi-line calls, a docstring full of operators, methods, tab or space indents.
_ATOMS = st.sampled_from(["a", "b", "xs", "n", "None", "True", "len(xs)", "xs[0]", "xs[n - 1]",
                          "0", "1", "7"])
_BINARY = st.sampled_from(["+", "-", "*", "/", "//", "%", "&", "|", "^", "<<", "and", "or",
                           "<", "<=", ">", "==", "!=", "is", "is not", "in", "not in"])


def _binary(parts: tuple[str, str, str, bool]) -> str:
    left, op, right, wrap = parts
    return f"({left} {op} {right})" if wrap else f"{left} {op} {right}"


_EXPRS = st.recursive(_ATOMS, lambda inner: st.one_of(
    st.tuples(inner, _BINARY, inner, st.booleans()).map(_binary),
    st.tuples(st.sampled_from(["f", "g.h", "max"]), st.lists(inner, max_size=3)).map(
        lambda call: f"{call[0]}({', '.join(call[1])})"),
    inner.map(lambda e: f"(not {e})"),
    inner.map(lambda e: f"-{e}"),
    st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
    st.tuples(inner, inner).map(lambda t: f"xs[{t[0]}:{t[1]}]"),
), max_leaves=6)


@st.composite
def _block(draw: st.DrawFn, depth: int = 0) -> list[str]:
    """Lines of a block, indented by one unit per level with "\t" standing for the unit."""
    lines: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        e1, e2 = draw(_EXPRS), draw(_EXPRS)
        kind = draw(st.sampled_from(["assign", "augassign", "return", "call", "oneliner", "multiline"]
                                    + (["if", "for", "while"] if depth < 1 else [])))
        comment = draw(st.sampled_from(["", "  # note", "  # é < 1"]))
        if kind == "assign":
            lines.append(f"x = {e1}{comment}")
        elif kind == "augassign":
            lines.append(f"x += {e1}")
        elif kind == "return":
            lines.append(f"return {e1}{comment}")
        elif kind == "call":
            lines.append(f"g.h({e1}, {e2}){comment}")
        elif kind == "oneliner":
            lines.append(f"y = {e1}; z = {e2}")
        elif kind == "multiline":
            lines += ["x = max(", f"\t{e1},  # first", f"\t{e2},", ")"]
        else:
            header = {"if": f"if {e1}:", "for": f"for i in range({e1}):", "while": f"while {e1}:"}[kind]
            lines += [header + comment] + ["\t" + line for line in draw(_block(depth + 1))]
            if kind == "if" and draw(st.booleans()):
                lines += ["else:"] + ["\t" + line for line in draw(_block(depth + 1))]
    return lines


@st.composite
def _modules(draw: st.DrawFn) -> str:
    unit = draw(st.sampled_from(["    ", "  ", "\t"]))
    body = ['"""Doc: a < b and x + 1 == 2, never mutated."""'] + draw(_block())
    method = draw(_block())
    text = "\n".join(["# a generated module", "import os", "", f"LIMIT = {draw(_EXPRS)}", "", "",
                      "def f(a, b, xs, n):", *("\t" + line for line in body), "", "",
                      "class K:", "\tdef m(self, a, b, xs, n):", *("\t\t" + line for line in method), "", "",
                      "print(f(1, 2, [3], 4))  # tail", ""])
    return text.replace("\t", unit)


@settings(max_examples=50, deadline=None)
@given(_modules())
def test_generated_modules(source: str) -> None:
    ast.parse(source)  # the generator writes valid Python
    for mutation in find_mutations(PATH, source):
        check(mutation)


# ---------------------------------------------------------------------------------------------------------
# Sampling


_REPO = {**_STDLIB, "pkg/tally.py": TALLY, "tests/test_tally.py": TALLY,
         "README.md": "def f(): return 1 < 2\n"}


def test_sample_is_deterministic_and_spread_out() -> None:
    picks = sample_mutations(_REPO, seed=3, limit=12)
    assert picks == sample_mutations(_REPO, seed=3, limit=12)
    assert picks != sample_mutations(_REPO, seed=4, limit=12)
    assert len(picks) == 12
    assert {m.path for m in picks} == {"textwrap.py", "shlex.py", "pkg/tally.py"}  # no test file, no README
    assert {m.path for m in picks[:3]} == {"textwrap.py", "shlex.py", "pkg/tally.py"}  # every file first
    assert len({(m.path, m.function) for m in picks}) == 12  # then a new function each time
    for mutation in picks:
        check(mutation)


def test_sample_respects_max_per_function_and_limit() -> None:
    small = {"pkg/tally.py": TALLY}
    assert [m.function for m in sample_mutations(small, seed=0, limit=10)] == ["tally", "single", "tally"]
    assert len(sample_mutations(small, seed=0, limit=10, max_per_function=5)) == 6  # `single` has 1
    assert sample_mutations(small, seed=0, limit=0) == []
    only = sample_mutations(small, seed=0, limit=10, operators=["flip_comparison"])
    assert only == []  # TALLY has no comparison


def test_sample_does_not_depend_on_the_hash_seed() -> None:
    """Task ids are regenerated from seeds in other processes: nothing may depend on set or hash order."""
    code = ("import json, sys; from m2rl.envs.swe.mutations import sample_mutations as s; "
            "files = json.loads(sys.stdin.read()); "
            "print(json.dumps([[m.path, m.lineno, m.mutated] for m in s(files, seed=5, limit=8)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(_REPO), capture_output=True,
                         text=True, env=env, check=True).stdout
    here = sample_mutations(_REPO, seed=5, limit=8)
    assert json.loads(out) == [[m.path, m.lineno, m.mutated] for m in here]
