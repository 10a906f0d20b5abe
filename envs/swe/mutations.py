"""Procedural bug injection: small AST-level mutations of Python source, applied to the text surgically.

`find_mutations` lists every mutation the operators in `OPERATORS` offer in one file; `sample_mutations`
picks a seeded subset spread over the files and functions of a repository.

A mutation rewrites only the characters it has to (an operator token, two arguments, a constant, a
condition) or drops a statement's whole lines, so comments and formatting stay byte-identical and the
diff is one small hunk inside one function. Each one is checked by re-parsing the edited statement (or
function): it must parse, with exactly the intended node in the changed place (which catches precedence
mistakes; a parenthesized variant is tried before giving up), and that node must differ from the original.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from m2rl.rewards.paths import is_test_path

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class Mutation:
    path: str  # repo-relative path of the file, e.g. "tinydb/queries.py"
    operator: str  # a key of OPERATORS
    lineno: int  # 1-based line of the changed node
    function: str  # qualified name of the enclosing function, e.g. "Query.__eq__"
    description: str  # for logs only (never shown to an agent), e.g. "flipped < to >="
    original: str  # the whole original file text
    mutated: str  # the whole mutated file text


def is_test_file(path: str) -> bool:
    """Test code is never mutated: the tests are the oracle that must catch the bug. The project's one rule
    for test paths (`m2rl.rewards.paths.is_test_path`, also what grading protects)."""
    return is_test_path(path)


# ---------------------------------------------------------------------------------------------------------
# Source text and functions


# The parser's line breaks (str.splitlines would also split at \f, \x1c and others).
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


class _Source:
    """The file text with its line starts, to turn the parser's (line, UTF-8 byte column) into str offsets."""

    def __init__(self, text: str, bom: str = "") -> None:
        self.text = text
        self.bom = bom  # a leading U+FEFF: kept in the file, but the parser rejects it in a str
        self.lines: list[str] = _LINE.findall(text)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + (col if line.isascii() else len(line.encode()[:col].decode()))

    def span(self, node: ast.expr | ast.stmt) -> tuple[int, int]:
        assert node.end_lineno is not None and node.end_col_offset is not None
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def own_lines(self, node: ast.stmt) -> tuple[int, int, str, str] | None:
        """(start, end, indent, line break) of the whole lines of a statement that shares them with no other
        code (a trailing comment goes with it); None for `a = 1; b = 2` or `if x: return`."""
        assert node.end_lineno is not None and node.end_col_offset is not None
        start, end = self.span(node)
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = self.text[self.starts[first]:start]
        tail = self.text[end:self.starts[last + 1]]
        if indent.strip() or (tail.strip() and not tail.lstrip().startswith("#")):
            return None
        line = self.lines[last]
        return self.starts[first], self.starts[last + 1], indent, line[len(line.rstrip("\r\n")):]


@dataclass
class _Function:
    """One function (or method) of a parsed file: the unit a mutation changes and is checked against."""

    node: FunctionNode
    qualname: str
    source: _Source
    parents: dict[ast.AST, ast.AST]

    @cached_property
    def statements(self) -> list[ast.stmt]:
        return self.node.body[1:] if _docstring(self.node) else self.node.body

    @cached_property
    def region(self) -> tuple[int, int]:
        """Whole lines from `def` to the end of the body (decorators and defaults run at definition time)."""
        assert self.node.end_lineno is not None
        return self.source.starts[self.node.lineno - 1], self.source.starts[self.node.end_lineno]

    def nodes(self) -> Iterator[ast.AST]:
        """Every node of the body in source order, without the docstring, nested functions and classes
        (they are functions of their own), f-strings (3.11 gives their inner nodes unreliable columns)
        and annotations of local variables (never evaluated)."""
        stack: list[ast.AST] = list(reversed(self.statements))
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.JoinedStr)):
                continue
            yield node
            children = [c for c in ast.iter_child_nodes(node)
                        if not (isinstance(node, ast.AnnAssign) and c is node.annotation)]
            stack.extend(reversed(children))

    def segment(self, node: ast.expr) -> str:
        start, end = self.source.span(node)
        return self.source.text[start:end]

    def path_to(self, node: ast.AST) -> tuple[ast.AST, list[tuple[str, int | None]]]:
        """The nearest ancestor of `node` that has a position, and the (field, list index) steps from it down
        to `node` (a comprehension or `arguments` has no position of its own)."""
        steps: list[tuple[str, int | None]] = []
        while True:
            parent = self.parents[node]
            steps.append(_slot(parent, node))
            if "lineno" in parent._attributes:
                return parent, steps[::-1]
            node = parent

    def unit(self, node: ast.AST) -> tuple[int, int, int]:
        """(start, end, first line) of the smallest whole-lines statement above `node`, or of the function:
        the text an edit of `node` is checked on. Re-parsing only that keeps the check cheap in long
        functions; the text around it is unchanged, so it parses as before."""
        while (node := self.parents[node]) is not self.node:
            if (isinstance(node, ast.stmt) and (lines := self.source.own_lines(node)) is not None
                    and not self.source.text.startswith("elif", lines[0] + len(lines[2]))):
                return lines[0], lines[1], node.lineno
        return *self.region, self.node.lineno

    def apply(self, edits: Sequence[_Edit], lo: int, hi: int) -> str:
        """The text between `lo` and `hi` with the edits applied."""
        text, out, pos = self.source.text, [], lo
        for edit in sorted(edits, key=lambda e: (e.start, e.end)):
            out += [text[pos:edit.start], edit.text]
            pos = edit.end
        out.append(text[pos:hi])
        return "".join(out)

    def holds(self, unit: str, first_lineno: int, change: _Change) -> bool:
        """Whether the edited unit parses with `change.new` in the place of `change.node`.

        Only the changed slot is compared, looked up from its parent by position: that catches precedence
        mistakes (the new text parses but regroups its neighbours) without dumping whole functions.
        """
        indented = unit[:1].isspace()
        tree = _parse(f"if 1:\n{unit}" if indented else unit)
        if tree is None:
            return False
        anchor, steps = self.path_to(change.node)
        lineno = anchor.lineno - first_lineno + 1 + indented  # type: ignore[attr-defined]
        *down, (name, index) = steps
        for found in _nodes_at(tree, lineno, anchor.col_offset):  # type: ignore[attr-defined]
            if type(found) is not type(anchor) or (holder := _follow(found, down)) is None:
                continue
            value = getattr(holder, name, None)
            if change.new is None:  # removed: the block is one statement shorter
                if isinstance(value, list) and len(value) == len(getattr(_follow(anchor, down), name)) - 1:
                    return True
                continue
            if index is not None:
                value = value[index] if isinstance(value, list) and index < len(value) else None
            if isinstance(value, ast.AST) and ast.dump(value) == ast.dump(change.new):
                return True
        return False


def _slot(parent: ast.AST, node: ast.AST) -> tuple[str, int | None]:
    for name, value in ast.iter_fields(parent):
        if value is node:
            return name, None
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is node:
                    return name, i
    raise ValueError("node not found in its parent")


def _follow(node: ast.AST, steps: Sequence[tuple[str, int | None]]) -> ast.AST | None:
    for name, index in steps:
        value = getattr(node, name, None)
        if index is not None:
            value = value[index] if isinstance(value, list) and index < len(value) else None
        if not isinstance(value, ast.AST):
            return None
        node = value
    return node


def _nodes_at(tree: ast.AST, lineno: int, col: int) -> Iterator[ast.AST]:
    """The nodes that start at (lineno, col), found by descending only into nodes whose span covers it."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if getattr(node, "lineno", None) == lineno and getattr(node, "col_offset", None) == col:
            yield node
        for child in ast.iter_child_nodes(node):
            start = getattr(child, "lineno", 0), getattr(child, "col_offset", 0)
            end = getattr(child, "end_lineno", None) or lineno, getattr(child, "end_col_offset", None) or col
            if start <= (lineno, col) <= end:  # a node without a position (comprehension) is searched too
                stack.append(child)


def _parse(text: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():  # invalid escapes in the repo's strings are not our concern
            warnings.simplefilter("ignore")
            return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes, bad surrogates
        return None


def _docstring(node: FunctionNode) -> bool:
    first = node.body[0]
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str))


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[FunctionNode, str]]:
    """Every function with its dotted qualified name (`Class.method`, `outer.inner`)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child, prefix + child.name
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


# ---------------------------------------------------------------------------------------------------------
# Operators: each looks at one node of a function body and proposes changes


@dataclass(frozen=True)
class _Edit:
    start: int  # str offsets into the file text
    end: int
    text: str


@dataclass(frozen=True)
class _Change:
    node: ast.expr | ast.stmt  # replaced by `new` in its parent; its line is the mutation's line
    new: ast.AST | None  # None: the statement is removed from its list
    edits: tuple[_Edit, ...]
    description: str


Operator = Callable[[ast.AST, _Function], Iterator[_Change]]


def _replace(fn: _Function, old: ast.expr, new: ast.expr, text: str, description: str) -> _Change:
    return _Change(old, new, (_Edit(*fn.source.span(old), text),), description)


def _operator_edit(fn: _Function, left: ast.expr, right: ast.expr, text: str) -> _Edit:
    """Replace the operator token between two operands, keeping the parentheses, spaces, line continuations
    and comments around it (in `(a) not  in b` the token is `not  in`)."""
    src = fn.source.text
    pos, end = fn.source.span(left)[1], fn.source.span(right)[0]
    first = last = -1
    while pos < end:
        if src[pos] == "#":
            while pos < end and src[pos] not in "\r\n":
                pos += 1
            continue
        if not (src[pos].isspace() or src[pos] in "()\\"):
            first = pos if first < 0 else first
            last = pos + 1
        pos += 1
    assert first >= 0, "no operator between operands"
    return _Edit(first, last, text)


_COMPARISON_TEXT: dict[type[ast.cmpop], str] = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
    ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in",
}
# The logical opposite first, then the neighbour that moves only the boundary.
_COMPARISON_FLIPS: dict[type[ast.cmpop], tuple[type[ast.cmpop], ...]] = {
    ast.Lt: (ast.GtE, ast.LtE), ast.LtE: (ast.Gt, ast.Lt),
    ast.Gt: (ast.LtE, ast.GtE), ast.GtE: (ast.Lt, ast.Gt),
    ast.Eq: (ast.NotEq,), ast.NotEq: (ast.Eq,), ast.Is: (ast.IsNot,), ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,), ast.NotIn: (ast.In,),
}


def flip_comparison(node: ast.AST, fn: _Function) -> Iterator[_Change]:
    """`a < b` -> `a >= b` or `a <= b`; `==`/`!=`, `is`/`is not`, `in`/`not in` to their opposite."""
    if not isinstance(node, ast.Compare):
        return
    operands = [node.left, *node.comparators]
    for i, op in enumerate(node.ops):
        for new_op in _COMPARISON_FLIPS[type(op)]:
            new = ast.Compare(node.left, [*node.ops[:i], new_op(), *node.ops[i + 1:]], node.comparators)
            old_text, new_text = _COMPARISON_TEXT[type(op)], _COMPARISON_TEXT[new_op]
            edit = _operator_edit(fn, operands[i], operands[i + 1], new_text)
            yield _Change(node, new, (edit,), f"flipped {old_text} to {new_text}")


_BINARY_TEXT: dict[type[ast.operator], str] = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.LShift: "<<", ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&",
}
_BINARY_FLIPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr,
}


def _is_text(node: ast.expr) -> bool:
    """A string literal, or concatenation or %-formatting built on one."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _is_text(node.left) or (isinstance(node.op, ast.Add) and _is_text(node.right))
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def flip_operator(node: ast.AST, fn: _Function) -> Iterator[_Change]:
    """`+`/`-`, `*`/`/`, `//` -> `/`, `%` -> `//`, `<<`/`>>`, `&`/`|`, `^` -> `|` (also in `x += 1`) and
    `and`/`or`. String concatenation and %-formatting are left alone: the TypeError would be trivial."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINARY_FLIPS:
        left = node.left if isinstance(node, ast.BinOp) else node.target
        right = node.right if isinstance(node, ast.BinOp) else node.value
        if isinstance(node.op, (ast.Add, ast.Mod)) and (_is_text(left) or _is_text(right)):
            return
        new_op = _BINARY_FLIPS[type(node.op)]
        old_text, new_text = _BINARY_TEXT[type(node.op)], _BINARY_TEXT[new_op]
        if isinstance(node, ast.BinOp):
            new: ast.AST = ast.BinOp(node.left, new_op(), node.right)
        else:
            new = ast.AugAssign(node.target, new_op(), node.value)
            old_text, new_text = old_text + "=", new_text + "="
        edit = _operator_edit(fn, left, right, new_text)
        yield _Change(node, new, (edit,), f"flipped {old_text} to {new_text}")
    elif isinstance(node, ast.BoolOp):
        old_text, new_text = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        new = ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
        edits = tuple(_operator_edit(fn, a, b, new_text) for a, b in itertools.pairwise(node.values))
        yield _Change(node, new, edits, f"flipped {old_text} to {new_text}")


def _int_value(node: ast.AST) -> int | None:
    """The value of an int literal, `-1` included (the parser gives it as unary minus on `1`)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_value(node.operand)
        return None if inner is None or isinstance(node.operand, ast.UnaryOp) else -inner
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _calls(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def _counts_or_indexes(node: ast.expr, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether a literal sits where off-by-one bugs live: an index or slice bound, a range() argument, a
    comparison, a return value, or arithmetic on len() -- directly or inside arithmetic that ends there."""
    top: ast.AST = node
    while isinstance(parents.get(top), (ast.BinOp, ast.UnaryOp)):
        top = parents[top]
        if isinstance(top, ast.BinOp) and (_calls(top.left, "len") or _calls(top.right, "len")):
            return True
    parent = parents.get(top)
    if isinstance(parent, ast.Tuple) and isinstance(parents.get(parent), ast.Subscript):
        top, parent = parent, parents[parent]  # x[i, 0]
    return ((isinstance(parent, ast.Subscript) and parent.slice is top)
            or isinstance(parent, (ast.Slice, ast.Compare, ast.Return))
            or (parent is not None and _calls(parent, "range") and top in getattr(parent, "args", ())))


def _int_node(value: int) -> ast.expr:
    return ast.UnaryOp(ast.USub(), ast.Constant(-value)) if value < 0 else ast.Constant(value)


def off_by_one(node: ast.AST, fn: _Function) -> Iterator[_Change]:
    """An int literal n -> n + 1 or n - 1 in index, slice, range(), len() arithmetic, comparison or return."""
    value = _int_value(node)
    parent = fn.parents.get(node)
    if value is None or (isinstance(parent, ast.UnaryOp) and _int_value(parent) is not None):
        return  # `-1` is handled once, as a whole
    assert isinstance(node, ast.expr)
    if not _counts_or_indexes(node, fn.parents):
        return
    for new_value in (value + 1, value - 1):
        new = _int_node(new_value)
        yield _replace(fn, node, new, ast.unparse(new), f"changed {value} to {new_value}")


def remove_statement(node: ast.AST, fn: _Function) -> Iterator[_Change]:
    """Drop one statement's lines from a function of at least two statements; `pass` keeps a block valid."""
    if (not isinstance(node, ast.stmt) or isinstance(node, ast.Pass) or len(fn.statements) < 2
            or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))):
        return
    lines = fn.source.own_lines(node)
    if lines is None:
        return
    start, end, indent, newline = lines
    block, _ = _slot(fn.parents[node], node)
    only = len(getattr(fn.parents[node], block)) == 1
    edit = _Edit(start, end, f"{indent}pass{newline}" if only else "")
    first_line = fn.source.lines[node.lineno - 1].strip()
    yield _Change(node, ast.Pass() if only else None, (edit,), f"removed statement `{first_line[:60]}`")


def swap_arguments(node: ast.AST, fn: _Function) -> Iterator[_Change]:
    """Swap two neighbouring positional arguments of a call that differ: `f(a, b)` -> `f(b, a)`."""
    if not isinstance(node, ast.Call):
        return
    args = node.args
    for i, (a, b) in enumerate(itertools.pairwise(args)):
        if isinstance(a, ast.Starred) or isinstance(b, ast.Starred) or ast.dump(a) == ast.dump(b):
            continue
        new = ast.Call(node.func, [*args[:i], b, a, *args[i + 2:]], node.keywords)
        (a_start, a_end), (b_start, b_end) = fn.source.span(a), fn.source.span(b)
        edits = (_Edit(a_start, a_end, fn.segment(b)), _Edit(b_start, b_end, fn.segment(a)))
        callee = ast.unparse(node.func)
        yield _Change(node, new, edits, f"swapped arguments {i + 1} and {i + 2} of {callee}()")


_ATOMS = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant)


def _negation(fn: _Function, test: ast.expr) -> tuple[ast.expr, str]:
    """`not (c)`, or `c` when the test already is `not c`; atoms get no parentheses."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return test.operand, fn.segment(test.operand)
    text = f"not {fn.segment(test)}" if isinstance(test, _ATOMS) else f"not ({fn.segment(test)})"
    return ast.UnaryOp(ast.Not(), test), text


_BOOLEAN_CALLS = ("isinstance", "issubclass", "hasattr", "callable", "all", "any", "bool")


def _is_boolean(node: ast.expr) -> bool:
    return (isinstance(node, ast.Compare) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))
            or any(_calls(node, name) for name in _BOOLEAN_CALLS)
            or (isinstance(node, ast.BoolOp) and all(_is_boolean(v) for v in node.values)))


def change_return(node: ast.AST, fn: _Function) -> Iterator[_Change]:
    """`return True` <-> `return False`, `return <condition>` -> `return not (<condition>)`, any other
    `return x` -> `return None`."""
    if not isinstance(node, ast.Return) or node.value is None:
        return
    value = node.value
    if isinstance(value, ast.Constant) and isinstance(value.value, bool):
        yield _replace(fn, value, ast.Constant(not value.value), str(not value.value),
                       f"returned {not value.value} instead of {value.value}")
    elif _is_boolean(value):
        yield _replace(fn, value, *_negation(fn, value), "negated the returned condition")
    elif not (isinstance(value, ast.Constant) and value.value is None):
        yield _replace(fn, value, ast.Constant(None), "None", "returned None")


def invert_condition(node: ast.AST, fn: _Function) -> Iterator[_Change]:
    """The test `c` of an if, elif, while or conditional expression -> `not (c)`."""
    if isinstance(node, (ast.If, ast.While, ast.IfExp)):
        kind = {ast.If: "if", ast.While: "while", ast.IfExp: "conditional expression"}[type(node)]
        yield _replace(fn, node.test, *_negation(fn, node.test), f"inverted the {kind} condition")


OPERATORS: dict[str, Operator] = {
    "flip_comparison": flip_comparison,
    "flip_operator": flip_operator,
    "off_by_one": off_by_one,
    "remove_statement": remove_statement,
    "swap_arguments": swap_arguments,
    "change_return": change_return,
    "invert_condition": invert_condition,
}


# ---------------------------------------------------------------------------------------------------------
# Finding and sampling


@dataclass(frozen=True)
class _Candidate:
    """A proposed change, checked (the expensive part) only when `build` is called."""

    path: str
    operator: str
    function: _Function
    change: _Change

    def build(self) -> Mutation | None:
        fn, change = self.function, self.change
        if change.new is not None and ast.dump(change.new) == ast.dump(change.node):
            return None  # e.g. swapping two equal arguments
        lo, hi, first_lineno = fn.unit(change.node)
        for edits in self._variants():
            unit = fn.apply(edits, lo, hi)
            if fn.holds(unit, first_lineno, change):
                text, bom = fn.source.text, fn.source.bom
                return Mutation(self.path, self.operator, change.node.lineno, fn.qualname, change.description,
                                bom + text, bom + text[:lo] + unit + text[hi:])
        return None

    def _variants(self) -> Iterator[tuple[_Edit, ...]]:
        """The edits as proposed, then with the changed expression parenthesized: `x ^ a & b` with `&`
        flipped must become `x ^ (a | b)`, not `x ^ a | b`."""
        yield self.change.edits
        node, edits = self.change.node, self.change.edits
        if isinstance(node, ast.expr):
            start, end = self.function.source.span(node)
            if len(edits) == 1 and (edits[0].start, edits[0].end) == (start, end):
                yield (_Edit(start, end, f"({edits[0].text})"),)
            else:
                yield (_Edit(start, start, "("), *edits, _Edit(end, end, ")"))


def _operators(names: Sequence[str] | None) -> list[tuple[str, Operator]]:
    unknown = sorted(set(names or ()) - OPERATORS.keys())
    if unknown:
        raise ValueError(f"unknown mutation operators {unknown}; known: {sorted(OPERATORS)}")
    return [(name, OPERATORS[name]) for name in (OPERATORS if names is None else dict.fromkeys(names))]


def _candidates(path: str, source: str, operators: list[tuple[str, Operator]]) -> Iterator[_Candidate]:
    bom = "\ufeff" if source.startswith("\ufeff") else ""
    if is_test_file(path) or (tree := _parse(source[len(bom):])) is None:
        return
    text = _Source(source[len(bom):], bom)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node, qualname in _functions(tree):
        fn = _Function(node, qualname, text, parents)
        for inner in fn.nodes():
            for name, operator in operators:
                for change in operator(inner, fn):
                    yield _Candidate(path, name, fn, change)


def find_mutations(path: str, source: str, operators: Sequence[str] | None = None) -> list[Mutation]:
    """Every valid mutation of one file, in source order (none for test files or unparsable sources).

    Each mutation carries the whole mutated text, so a file of thousands of lines costs that many copies:
    repositories go through `sample_mutations`, which builds only what it picks."""
    found, seen = [], set()
    for candidate in _candidates(path, source, _operators(operators)):
        mutation = candidate.build()
        if mutation is not None and mutation.mutated not in seen:
            seen.add(mutation.mutated)
            found.append(mutation)
    return found


def sample_mutations(files: Mapping[str, str], seed: int, limit: int, max_per_function: int = 2,
                     operators: Sequence[str] | None = None) -> list[Mutation]:
    """At most `limit` mutations of the `.py` files in `files` (path -> text), the same for the same seed.

    Picks are spread out: one function of every file first, then a second function of every file, and so
    on; only when every function has one pick does any get a second, up to `max_per_function`. Candidates
    are checked only when picked, so sampling a large repository costs little more than parsing it.
    """
    rng = random.Random(seed)
    chosen = _operators(operators)
    per_file: list[list[list[_Candidate]]] = []  # file -> function -> candidates, each level shuffled
    for path in sorted(files):
        if not path.endswith(".py"):
            continue
        by_function: dict[int, list[_Candidate]] = {}
        for candidate in _candidates(path, files[path], chosen):
            by_function.setdefault(id(candidate.function.node), []).append(candidate)
        groups = list(by_function.values())
        for group in groups:
            rng.shuffle(group)
        rng.shuffle(groups)
        if groups:
            per_file.append(groups)
    rng.shuffle(per_file)
    picks: list[Mutation] = []
    seen: set[tuple[str, str]] = set()
    most_functions = max((len(groups) for groups in per_file), default=0)
    for _ in range(max_per_function):
        for rank in range(most_functions):
            for groups in per_file:
                if len(picks) >= limit:
                    return picks
                if rank < len(groups) and (mutation := _take(groups[rank], seen)) is not None:
                    picks.append(mutation)
    return picks


def _take(group: list[_Candidate], seen: set[tuple[str, str]]) -> Mutation | None:
    """The next candidate of a function's shuffled list that builds into a mutation not picked before."""
    while group:
        mutation = group.pop().build()
        if mutation is not None and (mutation.path, mutation.mutated) not in seen:
            seen.add((mutation.path, mutation.mutated))
            return mutation
    return None
