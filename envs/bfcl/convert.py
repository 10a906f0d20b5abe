"""BFCL <-> M2: function docs to the tool specs the prompt lists, parsed calls to BFCL's call formats, and
BFCL's ground truth back to M2 tool calls (for the replay expert).

- Specs: BFCL's own `convert_to_tool` with the OpenAI style, as BFCL shows them to every OpenAI-style FC
  model: Gorilla types mapped to JSON-schema types (`dict` -> object, `float` -> number + a note, `tuple` ->
  array, `any` -> string), dots in names replaced by underscores (`math.factorial` -> `math_factorial`; the
  AST checker maps the expected names the same way, see checker.py).
- Calls: the parser's `ToolCall`s become `[{name: {param: value}}]` (BFCL's `decode_ast` form, what its AST
  checker takes) or `"name(param=repr(value),...)"` strings (BFCL's `convert_to_function_call`, what its
  executable backends take).
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
from collections.abc import Sequence
from keyword import iskeyword
from typing import Any

from m2rl.envs.bfcl.checker import load

Call = tuple[str, dict[str, Any]]


def tool_specs(functions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool specs `{"type": "function", "function": {...}}` of BFCL function docs, in their order."""
    bfcl = load()
    tools = bfcl.convert_to_tool(copy.deepcopy(list(functions)), bfcl.type_mappings.GORILLA_TO_OPENAPI,
                                 bfcl.enums.ModelStyle.OPENAI_COMPLETIONS)
    return [tool if "function" in tool else {"type": "function", "function": tool} for tool in tools]


def grading_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec calls are checked against before BFCL's checkers see them: the prompt's spec with every
    non-string type also accepting text, and no `enum`, `required` or closed parameter set enforced.

    The parser still types each value by the doc (text `3` for an integer is 3), but what the call may hold
    is BFCL's to judge, as an FC API without strict mode passes the model's JSON on: its AST checker takes
    a string where the doc wants another type (a variable name such as `data['sales']` for an array: some
    possible answers hold one), checks required and unexpected parameters itself, and enforces no enum (some
    possible answers lie outside the doc's enum; some docs put a string enum on an array). A multi-turn
    backend answers a call with a missing or unknown parameter with its own execution error."""
    function = copy.deepcopy(spec["function"])
    parameters = function.get("parameters") or {}
    _relax(parameters)
    parameters.pop("required", None)
    parameters.pop("additionalProperties", None)
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _relax(schema: Any) -> None:
    if not isinstance(schema, dict):
        return
    schema.pop("enum", None)
    kind = schema.get("type")
    if isinstance(kind, str) and kind not in ("string", "object") or isinstance(kind, list) and "string" not in kind:
        schema["type"] = [*(kind if isinstance(kind, list) else [kind]), "string"]
    for child in (schema.get("properties") or {}).values():
        _relax(child)
    _relax(schema.get("items"))


def presented_name(bfcl_name: str) -> str:
    """The name the policy sees for a BFCL function (`convert_to_tool`'s rule for OpenAI-style models)."""
    return bfcl_name.replace(".", "_")


def ast_form(calls: Sequence[Call]) -> list[dict[str, dict[str, Any]]]:
    """`[{name: arguments}]`: the decoded form BFCL's AST checker takes."""
    return [{name: dict(arguments)} for name, arguments in calls]


def executable_form(calls: Sequence[Call]) -> list[str]:
    """`["name(a='x',b=1)"]`: the strings BFCL's executable backends take (its `convert_to_function_call`).

    BFCL `eval`s these strings. Values are written with `repr` (JSON values: safe literals) and names come
    from the tool table, but parameter names are the policy's text: anything but a plain identifier is
    refused here (`ValueError`), so no text of the policy's ever runs as code."""
    for name, arguments in calls:
        bad = [key for key in arguments if not (isinstance(key, str) and key.isidentifier() and not iskeyword(key))]
        if bad or not name.isidentifier():
            raise ValueError(f"parameter names must be plain identifiers; {name} got {bad}")
    return list(load().convert_to_function_call(ast_form(calls))) if calls else []


# ------------------------------------------------------------------------------------------------ ground truth


def first_option(value: Any, required: frozenset[str] = frozenset()) -> Any:
    """One concrete value of a possible answer: BFCL lists the accepted values of each parameter (`""` among
    them: it may be omitted); a dict value lists them per key (recursively), a list of dicts per item.
    A parameter is omitted where the answer allows it and `required` does not name it, else it takes its
    first non-empty value."""
    if isinstance(value, dict):
        out = {}
        for key, options in value.items():
            if not isinstance(options, list) or not options:
                out[key] = first_option(options)
                continue
            concrete = [o for o in options if o != ""]
            if not concrete or ("" in options and key not in required):
                continue
            out[key] = first_option(concrete[0])
        return out
    if isinstance(value, list):
        return [first_option(item) for item in value]
    return value


def possible_answer_calls(ground_truth: Sequence[dict[str, dict[str, list[Any]]]],
                          functions: Sequence[dict[str, Any]]) -> list[Call]:
    """The calls of a single-turn possible answer, each parameter at its first accepted value, optional ones
    omitted (unless the function doc requires them)."""
    required = {f["name"]: frozenset(f.get("parameters", {}).get("required", [])) for f in functions}
    return [(presented_name(name), first_option(params, required.get(name, frozenset())))
            for call in ground_truth for name, params in call.items()]


def _backend_signature(method: str, involved_classes: Sequence[str]) -> inspect.Signature:
    paths = load().class_paths
    for class_name in involved_classes:
        cls = getattr(importlib.import_module(paths[class_name]), class_name)
        if hasattr(cls, method):
            return inspect.signature(getattr(cls, method))
    raise KeyError(f"no backend of {list(involved_classes)} has a method {method!r}")


def executable_call(text: str, involved_classes: Sequence[str]) -> Call:
    """`"sort('a.pdf')"` -> `("sort", {"file_name": "a.pdf"})`: a multi-turn ground-truth string as a tool call
    (positional arguments named from the backend method's signature)."""
    node = ast.parse(text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {text!r}")  # noqa: TRY004  (a bad string, not a bad type)
    name = node.func.id
    arguments: dict[str, Any] = {}
    if node.args:
        params = [p for p in _backend_signature(name, involved_classes).parameters if p != "self"]
        for param, arg in zip(params, node.args):
            arguments[param] = ast.literal_eval(arg)
    for keyword in node.keywords:
        assert keyword.arg is not None, f"**kwargs in a ground-truth call: {text!r}"
        arguments[keyword.arg] = ast.literal_eval(keyword.value)
    return name, arguments


def placeholder_call(spec: dict[str, Any]) -> Call:
    """A schema-valid call of `spec` (its required parameters at their default, first enum value or a typed
    placeholder): for BFCL's live_relevance, whose only check is that some call is made."""
    function = spec["function"]
    params = function.get("parameters") or {}
    arguments: dict[str, Any] = {}
    for key in params.get("required", []):
        prop = params.get("properties", {}).get(key, {})
        if "default" in prop:
            arguments[key] = prop["default"]
        elif prop.get("enum"):
            arguments[key] = prop["enum"][0]
        else:
            arguments[key] = {"integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}.get(
                prop.get("type", "string"), "example")
    return function["name"], arguments


def java_literal(value: Any, schema: dict[str, Any]) -> Any:
    """A possible answer's Python value written as the Java source BFCL's Java converter reads back
    (`java_type_converter`: `150L` for a long, `new ArrayList<>(Arrays.asList(...))`, `new int[]{...}`,
    `new HashMap<String, Object>() {{ put("k", v); }}`); text (a Java expression already) stays as it is."""
    if isinstance(value, str):
        return value
    kind, items = schema.get("type"), (schema.get("items") or {}).get("type")
    if kind == "long":
        return f"{value}L"
    if kind == "float":
        return f"{value}f"
    if kind in ("boolean",):
        return "true" if value else "false"
    if kind == "ArrayList" and isinstance(value, list):
        return f"new ArrayList<>(Arrays.asList({', '.join(_java_element(v, items) for v in value)}))"
    if kind == "Array" and isinstance(value, list):  # BFCL's array reader keeps quotes: String elements go bare
        bare = ", ".join(str(v) if items == "String" else _java_element(v, items) for v in value)
        return f"new {items or 'Object'}[]{{{bare}}}"
    if kind == "HashMap" and isinstance(value, dict):
        puts = " ".join(f'put("{k}", {_java_element(v, None)});' for k, v in value.items())
        return f"new HashMap<String, Object>() {{{{ {puts} }}}}"
    return str(value)


def _java_element(value: Any, kind: str | None) -> str:
    if kind == "String" or kind is None and isinstance(value, str):
        return f'"{value}"'
    if kind == "char":
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(java_literal(value, {"type": kind})) if kind else str(value)
