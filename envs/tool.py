"""Tools: typed Python callables whose OpenAI function spec comes from the signature and docstring.

A tool is a function or bound method. `tool_spec(fn)` derives
`{"type": "function", "function": {"name", "description", "parameters"}}` from
- type hints -> JSON-schema types (str, int, float, bool, list[T], dict, Literal[...], Optional[T]),
- defaults -> the parameter is not required,
- the docstring: first paragraph = description, Google-style `Args:` section = per-parameter descriptions.

`validate_arguments(spec, args)` checks arguments against that schema with the parser's validator
(`m2rl.agent.schema.check_arguments`: text is decoded to the declared types, enums and nesting depth are
checked) and returns `(coerced, errors)` with messages written for the model to act on. `closed_spec(spec)`
is the spec calls are checked against: a tool takes no parameter it does not declare.

A tool returns a `str` or a `ToolOutput` (which also reports edits, viewed files, commands, or the end of
the episode); it raises `ToolError` for a failure the model should read.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from m2rl.agent.schema import check_arguments

JsonSchema = dict[str, Any]


class ToolError(Exception):
    """A tool failed in a way the model can act on; the message is shown to the model verbatim."""


@dataclass
class ToolOutput:
    """What a tool call produced, beyond its text (feeds the env -> rewards `info` contract)."""

    output: str
    ok: bool = True  # the call did what was asked (a shell command's non-zero exit is ok=False)
    timed_out: bool = False
    error: str | None = None  # a failure to report in info["errors"] (kind "tool"); ToolError sets it
    edits: list[dict[str, Any]] = field(default_factory=list)  # [{"path": str, "syntax_ok": bool | None}]
    files_viewed: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    answer: str | None = None  # set by `submit`: the env ends the episode and grades it
    done: bool = False
    # Test results the tool parsed from what it ran ({"passed": [ids], "failed": [ids]}); None: it ran no
    # tests. Feeds info["tests"] and the `test_progress` reward.
    tests: dict[str, list[str]] | None = None


# ----------------------------------------------------------------------------- schema from signature

_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def type_to_schema(tp: Any) -> JsonSchema:
    """JSON schema of a Python type hint (the subset tools use)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        values = list(args)
        kinds = {_SCALARS.get(type(v)) for v in values}
        schema: JsonSchema = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[T]: the default (None) makes it optional, the type stays T
            return type_to_schema(members[0])
        return {"anyOf": [type_to_schema(a) for a in args]}
    if tp in (list, tuple, set) or origin in (list, tuple, set, typing.Sequence):
        schema = {"type": "array"}
        if args and args[0] is not Ellipsis:
            schema["items"] = type_to_schema(args[0])
        return schema
    if tp is dict or origin is dict:
        return {"type": "object"}
    raise TypeError(
        f"tool parameter type {tp!r} has no JSON-schema mapping; use str/int/float/bool/list/dict"
    )


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    description_lines: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    header = re.compile(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Notes?):\s*$")
    for line in lines:
        m = header.match(line.strip()) if not line.startswith((" ", "\t")) else None
        if m:
            section, current = m.group(1), None
            continue
        if section is None:
            description_lines.append(line)
        elif section in ("Args", "Arguments", "Parameters"):
            item = re.match(r"^\s{0,8}(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
            if item and (len(line) - len(line.lstrip())) <= 4:
                current = item.group(1).lstrip("*")
                params[current] = item.group(3).strip()
            elif current is not None and line.strip():
                params[current] = (params[current] + " " + line.strip()).strip()
    paragraphs = "\n".join(description_lines).strip().split("\n\n")
    description = " ".join(paragraphs[0].split()) if paragraphs and paragraphs[0] else ""
    return description, params


def tool_spec(fn: Callable[..., Any], name: str | None = None) -> JsonSchema:
    """OpenAI function spec of a tool callable: `{"type": "function", "function": {...}}`."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolved forward references are an authoring bug: say which tool
        raise TypeError(f"cannot resolve type hints of tool {fn!r}: {exc}") from exc
    description, param_docs = parse_docstring(inspect.getdoc(fn))
    properties: dict[str, JsonSchema] = {}
    required: list[str] = []
    for pname, param in sig.parameters.items():
        if pname == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = dict(type_to_schema(hints.get(pname, param.annotation)))
        if pname in param_docs:
            prop["description"] = param_docs[pname]
        if param.default is param.empty:
            required.append(pname)
        elif param.default is not None and isinstance(param.default, (str, int, float, bool)):
            prop["default"] = param.default
        properties[pname] = prop
    tool_name = name or getattr(fn, "__name__", None)
    if not tool_name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", tool_name):
        raise ValueError(f"tool name {tool_name!r} must match [A-Za-z_][A-Za-z0-9_-]*")
    return {
        "type": "function",
        "function": {
            "name": tool_name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


# ----------------------------------------------------------------------------- validation


def closed_spec(spec: JsonSchema) -> JsonSchema:
    """`spec` as calls are checked against it: a Python tool takes only the parameters it declares, so its
    parameters schema is closed (`additionalProperties: false`) unless the spec says otherwise. The prompt
    shows the spec as written."""
    function = spec.get("function", spec)
    parameters = dict(function.get("parameters") or {})
    parameters.setdefault("additionalProperties", False)
    return {"type": "function", "function": {**function, "parameters": parameters}}


def validate_arguments(spec: JsonSchema, args: Any) -> tuple[dict[str, Any], list[str]]:
    """Check `args` against a tool spec with the parser's validator (`m2rl.agent.schema`); returns (coerced
    args, error messages). Never raises."""
    function = closed_spec(spec)["function"]
    coerced, errors = check_arguments(str(function.get("name", "?")), function["parameters"], args)
    return coerced, [error.message for error in errors]


# ----------------------------------------------------------------------------- a bound tool


@dataclass
class Tool:
    """A callable with its spec; `Tool.of(fn)` builds one, `name` overrides the function's name."""

    fn: Callable[..., Any]
    spec: JsonSchema

    @classmethod
    def of(cls, fn: Callable[..., Any] | Tool, name: str | None = None) -> Tool:
        if isinstance(fn, Tool):
            return fn
        return cls(fn=fn, spec=tool_spec(fn, name=name))

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]

    def __call__(self, **kwargs: Any) -> ToolOutput:
        result = self.fn(**kwargs)
        if isinstance(result, ToolOutput):
            return result
        return ToolOutput(output="" if result is None else str(result))
