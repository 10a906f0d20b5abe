"""Text as tokens arrive: whole characters only, stop strings across tokens, and chat deltas that the final
parse agrees with (what was streamed is never taken back)."""

from __future__ import annotations

import pytest
from m2rl.agent.format import parse
from m2rl.model.serving.chat import ChatTextSplitter, openai_tool_calls
from m2rl.model.serving.text import REPLACEMENT, TextStream
from serving_helpers import TOOLS


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = []
    for token_id in ids:
        deltas.append(stream.push(token_id))
        if stream.stopped_by is not None:
            return deltas
    return [*deltas, stream.finish()]


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    text = "naïve café → 数学 🙂🙂 done"
    ids = tokenizer.encode(text)
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)  # the test needs split characters
    deltas = feed(TextStream(tokenizer.backend), ids)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens_is_cut_and_never_leaks(tokenizer, include) -> None:
    text = "print(22 + 7)\nresult = 29 and then more text"
    stop = "result ="
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer.backend, stop=("zzz", stop), include_stop=include)
    deltas = feed(stream, ids)
    expected = text[:text.index(stop) + (len(stop) if include else 0)]
    assert "".join(deltas) == stream.text == expected and stream.stopped_by == stop
    assert len(stream.ids) < len(ids)  # ended at the token that completed the stop string
    # Until it completed, no character of the stop string was released (held back, not taken back).
    assert len("".join(deltas[:-1])) <= text.index(stop)


def test_special_tokens_are_kept_or_skipped(tokenizer) -> None:
    ids = tokenizer.encode("<think>\nhm\n</think>\n\nok[e~[")
    assert "".join(feed(TextStream(tokenizer.backend, skip_special_tokens=False), ids)) == tokenizer.decode(ids)
    assert "".join(feed(TextStream(tokenizer.backend, skip_special_tokens=True), ids)) == "\nhm\n\n\nok"


OUTPUTS = [  # what the model writes after `]~b]ai\n<think>\n`
    ('Need the tool.\n</think>\n\n\n<minimax:tool_call>\n<invoke name="python">\n<parameter name="code">'
     'print(22 + 7)\n</parameter>\n</invoke>\n</minimax:tool_call>[e~['),
    "Two lines\n\nof thought.\n</think>\n\nThe answer is 4.\n\n[e~[",
    ('Short.\n</think>\n\nLet me check.\n<minimax:tool_call>\n<invoke name="submit">\n'
     '<parameter name="answer">29</parameter>\n</invoke>\n</minimax:tool_call>[e~['),
    "Thinking that never closes\n\n",
    "no think\n</think>\n\n\n\nleading newline kept\n",
]


@pytest.mark.parametrize("text", OUTPUTS)
@pytest.mark.parametrize("chunking", ["tokens", "chars"])
def test_chat_deltas_add_up_to_the_final_parse(tokenizer, text, chunking) -> None:
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text)] if chunking == "tokens" else list(text)
    assert "".join(pieces) == text
    splitter = ChatTextSplitter(TOOLS, enable_thinking=True)
    reasoning = content = ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c, parsed = splitter.finish()
    final = parse(text, TOOLS, enable_thinking=True)
    assert (reasoning + r, content + c) == (final.reasoning, final.content)
    assert parsed.tool_calls == final.tool_calls


def test_tool_calls_in_openai_shape() -> None:
    parsed = parse(OUTPUTS[0], TOOLS, enable_thinking=True)
    [call] = openai_tool_calls(parsed.tool_calls)
    assert call.type == "function" and call.function.name == "python" and call.id.startswith("call_")
    assert call.function.arguments == '{"code": "print(22 + 7)\\n"}'  # verbatim value, JSON-encoded
