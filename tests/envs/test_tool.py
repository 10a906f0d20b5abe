"""Tool specs from signatures/docstrings and argument validation (pure; no sandbox)."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.agent.format import parse, render_completion
from m2rl.envs.tool import Tool, ToolOutput, closed_spec, parse_docstring, tool_spec, validate_arguments


def search(
    query: str,
    limit: int = 5,
    exact: bool = False,
    scale: float | None = None,
    tags: list[str] | None = None,
    mode: Literal["fast", "full"] = "fast",
    extra: dict | None = None,
) -> str:
    """Search the index for documents.

    Longer explanation that is not part of the description.

    Args:
        query: What to look for.
        limit (int): How many results
            to return at most.
        exact: Match the whole phrase.
        scale: A weight.
        tags: Only documents with these tags.
        mode: Search mode.
        extra: Additional filters.
    """
    return f"{query}:{limit}"


def test_spec_golden() -> None:
    spec = tool_spec(search)
    assert spec == {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the index for documents.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for."},
                    "limit": {
                        "type": "integer",
                        "description": "How many results to return at most.",
                        "default": 5,
                    },
                    "exact": {"type": "boolean", "description": "Match the whole phrase.", "default": False},
                    "scale": {"type": "number", "description": "A weight."},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Only documents with these tags.",
                    },
                    "mode": {
                        "enum": ["fast", "full"],
                        "type": "string",
                        "description": "Search mode.",
                        "default": "fast",
                    },
                    "extra": {"type": "object", "description": "Additional filters."},
                },
                "required": ["query"],
            },
        },
    }
    json.dumps(spec)  # the spec must be plain JSON (it is rendered into the prompt)


def test_bound_method_drops_self_and_name_override() -> None:
    class Box:
        def put(self, item: str) -> str:
            """Put an item in the box."""
            return item

    spec = tool_spec(Box().put, name="box_put")
    assert spec["function"]["name"] == "box_put"
    assert list(spec["function"]["parameters"]["properties"]) == ["item"]


class Custom:
    pass


def takes_custom(x: Custom) -> str:
    return ""


def test_unsupported_type_is_an_authoring_error() -> None:
    with pytest.raises(TypeError, match="no JSON-schema mapping"):
        tool_spec(takes_custom)


def test_docstring_parsing_without_args_section() -> None:
    assert parse_docstring("Just a line.\n\nMore.") == ("Just a line.", {})
    assert parse_docstring(None) == ("", {})


@pytest.mark.parametrize(
    "args, expected",
    [
        ({"query": "q", "limit": "7"}, {"query": "q", "limit": 7}),
        ({"query": "q", "limit": "7.0"}, {"query": "q", "limit": 7}),
        ({"query": "q", "exact": "true"}, {"query": "q", "exact": True}),
        ({"query": "q", "exact": "False"}, {"query": "q", "exact": False}),
        ({"query": "q", "scale": "1.5"}, {"query": "q", "scale": 1.5}),
        ({"query": "q", "scale": 2}, {"query": "q", "scale": 2}),
        ({"query": "q", "tags": '["a", "b"]'}, {"query": "q", "tags": ["a", "b"]}),
        ({"query": "q", "extra": '{"k": 1}'}, {"query": "q", "extra": {"k": 1}}),
        ({"query": 12}, {"query": "12"}),
        ({"query": "q", "tags": "[1, 2]"}, {"query": "q", "tags": ["1", "2"]}),
        ({"query": "q", "mode": "full"}, {"query": "q", "mode": "full"}),
    ],
)
def test_coercion(args: dict, expected: dict) -> None:
    coerced, errors = validate_arguments(tool_spec(search), args)
    assert errors == []
    assert coerced == expected


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "Tool 'search' is missing required parameter 'query'"),
        (
            {"query": "q", "limit": "many"},
            "Parameter 'limit' of tool 'search' must be an integer, got string 'many'",
        ),
        ({"query": "q", "limit": "2.5"}, "must be an integer"),
        ({"query": "q", "limit": True}, "must be an integer, got boolean"),
        ({"query": "q", "exact": "maybe"}, "must be a boolean (true or false)"),
        ({"query": "q", "tags": "[1, 2"}, "must be a JSON array; could not decode"),
        (
            {"query": "q", "tags": '[["a"]]'},
            "Parameter 'tags'[0] of tool 'search' must be a string, got array",
        ),
        ({"query": "q", "extra": "[1]"}, "must be an object, got array"),
        ({"query": "q", "mode": "slow"}, 'must be one of "fast", "full"'),
        (
            {"query": "q", "colour": "red"},
            "Tool 'search' has no parameter 'colour'; its parameters are: query, limit, exact",
        ),
        ({"query": ["q"]}, "must be a string, got array"),
    ],
)
def test_schema_errors_name_the_problem(args: dict, message: str) -> None:
    _, errors = validate_arguments(tool_spec(search), args)
    assert any(message in e for e in errors), errors


def test_non_mapping_arguments() -> None:
    assert validate_arguments(tool_spec(search), ["q"])[1] == [
        "arguments of tool 'search' must be a mapping of parameter names to values"
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["query", "limit", "exact", "scale", "tags", "mode", "extra", "zzz"]),
        json_values,
        max_size=6,
    )
)
def test_validation_never_raises_and_coerced_values_fit(args: dict) -> None:
    coerced, errors = validate_arguments(tool_spec(search), args)
    assert all(isinstance(e, str) and e for e in errors)
    if not errors:  # whatever passes can be called
        Tool.of(search)(**coerced)
        assert isinstance(coerced["query"], str)
        assert "limit" not in coerced or (
            isinstance(coerced["limit"], int) and not isinstance(coerced["limit"], bool)
        )


def test_tool_wraps_plain_returns() -> None:
    out = Tool.of(search)(query="x")
    assert out == ToolOutput(output="x:5")


@pytest.mark.parametrize(
    "value",
    [
        json.loads("[" * 500 + "]" * 500),  # decoded already (e.g. an OpenAI chat-mode call)
        "[" * 500 + "]" * 500,  # a JSON string the validator decodes
        "[" * 100_000 + "]" * 100_000,  # deeper than json.loads can recurse
    ],
)
def test_deeply_nested_arguments_are_schema_errors(value) -> None:
    """Before: the 100_000-deep string raised RecursionError out of validate_arguments."""
    coerced, errors = validate_arguments(tool_spec(search), {"query": "q", "tags": value})
    assert "tags" not in coerced
    assert len(errors) == 1 and "tags" in errors[0] and "nested" in errors[0], errors


TEXT_VALUES = st.one_of(st.sampled_from(["7", "7.0", "2.5", "true", "False", "None", "null", "fast", "slow", "[1, 2",
                                         '["a", "b"]', "[1, [2]]", '{"k": 1}', "[1]", "", " 3 "]),
                        st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)).filter(
    lambda text: not any(marker in text for marker in ("[e~[", "]~b]", "]~!b[")))  # special tokens end the call


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["query", "limit", "exact", "scale", "tags", "mode", "extra", "zzz"]),
                       TEXT_VALUES, max_size=5))
def test_parser_and_validate_arguments_are_one_validator(args: dict) -> None:
    """What the model writes as text is accepted, typed and refused alike by the parser (which is all ToolEnv
    runs) and by `validate_arguments`."""
    spec = tool_spec(search)
    coerced, errors = validate_arguments(spec, args)
    message = {"role": "assistant", "content": "", "tool_calls": [{"name": "search", "arguments": args}]}
    out = parse(render_completion(message), [closed_spec(spec)])
    if errors:
        assert out.tool_calls == [] and len(out.errors) == 1
        assert out.errors[0].message == " ".join(errors)
    else:
        assert out.errors == [] and out.tool_calls[0].arguments == coerced
