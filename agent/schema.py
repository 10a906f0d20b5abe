"""Tool-call arguments checked against their tool's JSON schema: the one validator.

The parser (`agent/parse.py`) checks every call the model writes with `check_arguments`, so `ToolEnv` runs
only calls that passed it; `m2rl.envs.tool.validate_arguments` is the same check for arguments that arrive
already decoded (an OpenAI chat-mode call). Decisions (documented because peers differ):

- A value may be text (the M2 format writes every parameter as text) or an already decoded JSON value.
  Text is typed by the schema: integer, number, boolean, null, array and object values are read as JSON,
  then leniently (Python literals, `True`, `None`); a typed reading wins over the text itself when the
  schema also allows a string (`"7"` is 7 for `integer | string`). A number where a string is expected
  keeps its text (`12` -> `"12"`).
- Types come from `type` (a name or a list), `anyOf`/`oneOf` (each alternative tried, typed ones first for
  text) or the values of `enum`; `items` types each element of an array; `enum` restricts the value.
  An empty schema or an unknown type name accepts the value as is.
- A key absent from `properties` is kept as is unless `additionalProperties` is false; a required key that
  is missing is an error.
- Values nest at most `MAX_VALUE_DEPTH` levels (`[[...]]`); deeper is an error (`too_deep`): every later
  deep copy, `repr` and `json.dumps` of the arguments recurses once per level.

Messages are written for the model to act on. Never raises.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MAX_VALUE_DEPTH = 32  # nesting levels of one parameter value; real arguments use a handful
MAX_LITERAL_CHARS = 100_000  # longer text is not read as a Python literal (its parser is slow and recursive)
JSON_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")
TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number",
              "boolean": "a boolean (true or false)", "null": "null", "array": "an array", "object": "an object"}
TYPE_EXAMPLES = {"integer": "3", "number": "1.5", "boolean": "true", "null": "null",
                 "array": '["a", "b"]', "object": '{"key": "value"}', "string": "text"}
_LENIENT_WORDS = {"true": True, "false": False, "null": None, "none": None}


@dataclass(frozen=True)
class ArgumentError:
    """One problem with a call's arguments."""

    code: str  # "missing_argument" | "unexpected_argument" | "bad_type" | "bad_value" | "too_deep" | "not_a_mapping"
    message: str  # for the model to act on
    key: str | None = None  # the parameter it is about


@dataclass(frozen=True)
class _Problem:
    code: str
    path: str  # the parameter and, inside it, the element: 'tags'[0]
    predicate: str  # "must be an integer, got string 'x'"


class _NoFit:
    """The value has no reading of the wanted types."""


NO_FIT = _NoFit()


def json_type(value: Any) -> str:
    """The JSON-schema type name of a decoded value (`bool` is boolean, not integer)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def schema_types(schema: Any) -> set[str]:
    """The JSON types `schema` admits (from `type`, `anyOf`/`oneOf`, or `enum` values); empty = anything."""
    if not isinstance(schema, Mapping):
        return set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types = {declared}
    elif isinstance(declared, list):
        types = {t for t in declared if isinstance(t, str)}
    else:
        types = set()
    for key in ("anyOf", "oneOf"):
        for option in _alternatives(schema, key):
            types |= schema_types(option)
    if not types and isinstance(schema.get("enum"), list):
        types = {json_type(v) for v in schema["enum"]}
    return types & set(JSON_TYPES)  # unknown type names are ignored: the value is accepted as is


def nesting_depth(value: Any, limit: int = MAX_VALUE_DEPTH) -> int:
    """Levels of list/tuple/dict nesting in `value` (a scalar is 0), counted without recursion and
    without looking deeper than `limit + 1` levels (enough to say "too deep")."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _alternatives(schema: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    options = schema.get(key)
    return [o for o in options if isinstance(o, Mapping)] if isinstance(options, list) else []


def _short(value: Any, limit: int = 60) -> str:
    """The value as the model wrote it, cut for a message."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _wanted(types: set[str]) -> str:
    return " or ".join(TYPE_NAMES[t] for t in sorted(types))


def _json_reading(text: str) -> tuple[Any, str | None]:
    """(decoded value, None), or (NO_FIT, why not): "too_deep" or the decoder's message."""
    try:
        return json.loads(text), None
    except RecursionError:
        return NO_FIT, "too_deep"
    except json.JSONDecodeError as exc:
        return NO_FIT, f"{exc.msg} at character {exc.pos}"
    except ValueError as exc:  # e.g. an integer with too many digits
        return NO_FIT, str(exc)


def _lenient_readings(text: str) -> list[Any]:
    """Readings of text that is not JSON: `True`, `None`, Python literals (`['a']`, `(1, 2)`)."""
    out: list[Any] = []
    if text.lower() in _LENIENT_WORDS:
        out.append(_LENIENT_WORDS[text.lower()])
    if len(text) <= MAX_LITERAL_CHARS:
        try:
            with warnings.catch_warnings():  # e.g. SyntaxWarning for "\\d" escapes in model text
                warnings.simplefilter("ignore")
                value = ast.literal_eval(text)
            out.append(list(value) if isinstance(value, tuple) else value)
        except Exception:  # noqa: BLE001  literal_eval raises many types (ValueError, SyntaxError, MemoryError, ...)
            logger.debug("not a Python literal; the text stays text", exc_info=True)
    return out


def _fit(value: Any, types: set[str]) -> Any:
    """`value` as one of `types`, or NO_FIT. An integral float is an integer; an integer is a number."""
    kind = json_type(value)
    if kind in types:
        return list(value) if isinstance(value, tuple) else value
    if kind == "integer" and "number" in types:
        return value
    if kind == "number" and "integer" in types and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if kind in ("integer", "number") and "string" in types:
        return str(value)  # a number where text is expected is harmless: keep its text
    return NO_FIT


def _typed(value: Any, types: set[str], path: str) -> tuple[Any, _Problem | None]:
    """`value` read as one of `types` (text is decoded), or a bad_type / too_deep problem."""
    if not isinstance(value, str) or types <= {"string"}:
        fitted = _fit(value, types)
        if fitted is NO_FIT:
            return value, _Problem("bad_type", path, f"must be {_wanted(types)}, got {json_type(value)} {_short(value)}")
        return fitted, None
    text = value.strip()
    decoded, why_not = _json_reading(text)
    readings = ([] if decoded is NO_FIT else [decoded]) + _lenient_readings(text)
    for reading in readings:
        fitted = _fit(reading, types - {"string"})
        if fitted is not NO_FIT:
            return fitted, None
    if "string" in types:
        return value, None
    if why_not == "too_deep":
        return value, _too_deep(path)
    if decoded is not NO_FIT:  # valid JSON of another type: say which
        return value, _Problem("bad_type", path, f"must be {_wanted(types)}, got {json_type(decoded)} {_short(decoded)}")
    if types <= {"array", "object"} and why_not:
        wanted = " or ".join(f"a JSON {t}" for t in sorted(types))
        return value, _Problem("bad_type", path, f"must be {wanted}; could not decode {_short(value)}: {why_not}")
    return value, _Problem("bad_type", path, f"must be {_wanted(types)}, got string {_short(value)}")


def _coerce(value: Any, schema: Any, path: str) -> tuple[Any, _Problem | None]:
    """`value` as `schema` types it, or the first problem found (with the path of the offending element)."""
    if not isinstance(schema, Mapping):
        return value, None
    options = _alternatives(schema, "anyOf") or _alternatives(schema, "oneOf")
    if options:
        if isinstance(value, str):  # text: typed readings before the text itself
            options = sorted(options, key=lambda option: schema_types(option) <= {"string"})
        for option in options:
            coerced, problem = _coerce(value, option, path)
            if problem is None:
                return coerced, None
        return value, _Problem("bad_type", path, f"must be {_wanted(schema_types(schema)) or 'one of the allowed types'}, "
                                                 f"got {json_type(value)} {_short(value)}")
    types = schema_types(schema)
    out = value
    if types:
        out, problem = _typed(value, types, path)
        if problem is not None:
            return value, problem
        if isinstance(value, str) and nesting_depth(out) > MAX_VALUE_DEPTH:  # decoded from text: bound it first
            return value, _too_deep(path)
    items = schema.get("items")
    if isinstance(out, list) and isinstance(items, Mapping):
        elements = []
        for index, element in enumerate(out):
            coerced, problem = _coerce(element, items, f"{path}[{index}]")
            if problem is not None:
                return value, problem
            elements.append(coerced)
        out = elements
    allowed = schema.get("enum")
    if isinstance(allowed, list) and out not in allowed:
        listed = ", ".join(json.dumps(v, ensure_ascii=False) for v in allowed)
        return value, _Problem("bad_value", path, f"must be one of {listed}; got {_short(value)}")
    return out, None


def coerce_value(value: Any, schema: Any) -> tuple[Any, str | None]:
    """(`value` as `schema` types it, None) or (`value`, what is wrong with it)."""
    out, problem = _coerce_checked(value, schema, "the value")
    return out, None if problem is None else f"{problem.path} {problem.predicate}"


def _coerce_checked(value: Any, schema: Any, path: str) -> tuple[Any, _Problem | None]:
    """`_coerce` of a value whose depth is bounded first (decoded input; text is bounded once decoded)."""
    if nesting_depth(value) > MAX_VALUE_DEPTH:
        return value, _too_deep(path)
    return _coerce(value, schema, path)


def _too_deep(path: str) -> _Problem:
    return _Problem("too_deep", path, f"is nested more than {MAX_VALUE_DEPTH} levels deep")


def _message(tool: str, key: str, problem: _Problem, wrote_text: bool, schema: Any) -> str:
    where = f"Parameter {problem.path} of tool {tool!r}"
    if problem.code == "too_deep":
        return f"{where} {problem.predicate}; pass flatter data (or a string)."
    message = f"{where} {problem.predicate}."
    types = schema_types(schema) - {"string"}
    if problem.code == "bad_type" and wrote_text and types and problem.path == repr(key):
        example = TYPE_EXAMPLES[min(types)]
        message += f" Write it as JSON, e.g. <parameter name=\"{key}\">{example}</parameter>."
    return message


def check_arguments(tool: str, parameters: Any, arguments: Any) -> tuple[dict[str, Any], list[ArgumentError]]:
    """Check a call of `tool` against its `parameters` schema (the spec's "parameters" object).

    Returns (the arguments its schema accepts, typed; one error per problem). The call is valid when
    the error list is empty.
    """
    if not isinstance(arguments, Mapping):
        return {}, [ArgumentError("not_a_mapping",
                                  f"arguments of tool {tool!r} must be a mapping of parameter names to values")]
    schema: Mapping[str, Any] = parameters if isinstance(parameters, Mapping) else {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = [key for key in (schema.get("required") or []) if isinstance(key, str)]
    errors = [
        ArgumentError("missing_argument",
                      f"Tool {tool!r} is missing required parameter {key!r}. Call it as <invoke name=\"{tool}\">"
                      f"<parameter name=\"{key}\">...</parameter></invoke>.", key)
        for key in required if key not in arguments
    ]
    typed: dict[str, Any] = {}
    for key, value in arguments.items():
        if key not in properties:
            if schema.get("additionalProperties") is False:
                takes = ", ".join(properties) or "none"
                errors.append(ArgumentError("unexpected_argument",
                                            f"Tool {tool!r} has no parameter {key!r}; its parameters are: {takes}.", key))
            else:
                typed[key] = value
            continue
        out, problem = _coerce_checked(value, properties[key], repr(key))
        if problem is not None:
            errors.append(ArgumentError(problem.code, _message(tool, key, problem, isinstance(value, str),
                                                               properties[key]), key))
        else:
            typed[key] = out
    return typed, errors
