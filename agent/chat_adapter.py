"""OpenAI chat messages with native `tool_calls` <-> the M2 text episodes the envs take and the graders score.

A hosted model (any OpenAI-compatible chat API) and our own policies play the same episodes, scored by the
same grader, because every chat turn is mapped onto exactly the M2 text an M2 model would have written:

- chat -> M2: `assistant_text(message)` is what follows the generation prompt for an assistant message
  {content, reasoning_content, tool_calls: [{id, type: "function", function: {name, arguments}}]}: the
  `<think>` block (thinking on only), the content, the calls as `<minimax:tool_call>` XML written by
  `agent/render.py`, and `[e~[`. The env's parser (`agent/parse.py`) reads back the same calls with the same
  arguments and JSON types (tests/agent/test_chat_adapter.py checks it on generated messages). A call whose
  `arguments` is not a JSON object is written as an invoke holding that text, so the env answers it with
  its normal format error in that call's place, never a crash.
- M2 -> chat: `chat_messages(view)` turns an episode's message view (the env's system and user prompt, the
  assistant turns, the tool replies recovered from each rendered suffix) into a chat conversation: tool calls
  get ids and JSON-string arguments, and each tool reply becomes {"role": "tool", "tool_call_id", "content"}.
  The env replies once per invoke, in order, so the k-th reply answers the k-th call; `render` of the result
  gives the episode's text again (rendering ignores ids). Where the counts differ (a reply about the block as
  a whole, calls over the per-turn limit) the chat view stays valid for a chat API: see `answer_calls`.

`ChatAgentPolicy` drives the agent loop (agent/loop.py) with a chat model; `m2rl.envs.chat_env.ChatEnv`
lets chat-style users step an env with assistant messages. Episodes a chat model played are evaluation
only: their ids are our tokenization of its messages, not sampled ids (`Trajectory.chat_mode`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from m2rl.agent.format import (
    EOS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    RenderError,
    neutralize_markers,
    render_completion,
)
from m2rl.agent.loop import Tokenizer, suffix_messages
from m2rl.agent.policy import PolicyError, PolicyOutput, SamplingParams
from m2rl.agent.render import INVOKE_CLOSE, INVOKE_OPEN, render_invoke, split_reasoning

if TYPE_CHECKING:  # httpx stays out of envs that only map messages (ChatEnv)
    from m2rl.agent.openai_policy import ChatOutput

NOT_RUN = "Error: the environment returned no result for this tool call; it was not run."


# ------------------------------------------------------------------------------------------------ chat -> M2

def assistant_message(message: Mapping[str, Any], enable_thinking: bool = True, turn: int = 0) -> dict[str, Any]:
    """An OpenAI assistant message in the one form the adapter keeps: `content` and `reasoning_content`
    strings (reasoning from `reasoning_content`, `reasoning`, or an inline `<think>...</think>` in the
    content; dropped with thinking off, since the M2 text then has no think block), and, when it made calls,
    `tool_calls` with an id (`call_{turn}_{i}` when missing) and `arguments` as a JSON string."""
    if not isinstance(message, Mapping):
        raise TypeError(f"an assistant message must be a mapping, got {type(message).__name__}")
    fields = dict(message)
    if not isinstance(fields.get("reasoning_content"), str) and isinstance(fields.get("reasoning"), str):
        fields["reasoning_content"] = fields["reasoning"]  # vLLM's newer name
    reasoning, content = split_reasoning(fields)
    out: dict[str, Any] = {"role": "assistant", "content": content,
                           "reasoning_content": reasoning if enable_thinking else ""}
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [chat_tool_call(call, turn, i) for i, call in enumerate(calls)]
    return out


def chat_tool_call(call: Any, turn: int = 0, index: int = 0) -> dict[str, Any]:
    """One call as {id, type: "function", function: {name, arguments: JSON string}}; a call of another shape
    keeps what it has (a missing name is "", which the env reports as a malformed call)."""
    if not isinstance(call, Mapping):
        return {"id": f"call_{turn}_{index}", "type": "function",
                "function": {"name": "", "arguments": json.dumps(call, ensure_ascii=False, default=str)}}
    fn = call["function"] if isinstance(call.get("function"), Mapping) else call
    name = fn.get("name") if isinstance(fn.get("name"), str) else ""
    arguments = fn.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps({} if arguments is None else arguments, ensure_ascii=False, default=str)
    call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else f"call_{turn}_{index}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def invoke_text(call: Mapping[str, Any]) -> str:
    """One `<invoke>` of the tool-call block, as `agent/render.py` writes it. Arguments that are not a JSON
    object are kept as the invoke's text (markers broken): the parser reports that call as malformed, and the
    env answers it with a format error in its place."""
    try:
        return render_invoke(call)
    except RenderError:
        fn = call["function"]
        name, raw = neutralize_markers(fn["name"]), neutralize_markers(fn["arguments"])
        return f'{INVOKE_OPEN} name="{name}">\n{raw}\n{INVOKE_CLOSE}\n'


def assistant_text(message: Mapping[str, Any], enable_thinking: bool = True) -> str:
    """The M2 text of an OpenAI assistant message: what the model writes after the generation prompt
    (`]~b]ai\\n<think>\\n` with thinking on), through `[e~[`. For a message whose calls all have JSON-object
    arguments this is `render_completion(message)`."""
    m = assistant_message(message, enable_thinking)
    calls = m.get("tool_calls", [])
    block = f"\n{TOOL_CALL_OPEN}\n" + "".join(invoke_text(c) for c in calls) + TOOL_CALL_CLOSE if calls else ""
    # The block goes in as content: render_completion writes content verbatim after the think block.
    return render_completion({"role": "assistant", "reasoning_content": m["reasoning_content"],
                              "content": m["content"] + block}, enable_thinking)


def chat_output_message(out: ChatOutput, enable_thinking: bool = True, turn: int = 0) -> dict[str, Any]:
    """The assistant message of a `/v1/chat/completions` answer (`OpenAIPolicy.chat`), with each call's
    arguments as the server sent them (the raw text when it was not valid JSON)."""
    raw_message = ((out.raw.get("choices") or [{}])[0] or {}).get("message") or {}
    raw_calls = raw_message.get("tool_calls") or []
    calls = []
    for i, call in enumerate(out.tool_calls):
        arguments: Any = call.arguments
        if call.error is not None and i < len(raw_calls) and isinstance(raw_calls[i], Mapping):
            arguments = (raw_calls[i].get("function") or {}).get("arguments", "")
        calls.append({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}})
    message = {"role": "assistant", "content": out.content, "reasoning_content": out.reasoning, "tool_calls": calls}
    return assistant_message(message, enable_thinking, turn)


# ------------------------------------------------------------------------------------------------ M2 -> chat

def observation_messages(observation: str, responses: Sequence[str] | None, enable_thinking: bool = True
                         ) -> list[dict[str, Any]]:
    """The tool or user messages an env observation (a rendered suffix, or `[e~[` alone) stands for."""
    body = observation.removeprefix(EOS)
    return suffix_messages(body, list(responses or []), enable_thinking) if body else []


def answer_calls(calls: Sequence[Mapping[str, Any]], replies: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The env's replies to one assistant turn as chat messages. The k-th tool reply answers the k-th call
    (ToolEnv replies once per invoke, in order). A chat API wants exactly one tool message per call, so
    replies beyond the calls (an error about the block as a whole) join the last tool message, a call left
    without a reply gets `NOT_RUN`, and tool replies to a turn without calls become one user message. User
    replies pass through."""
    tool_replies = [r for r in replies if r.get("role") == "tool"]
    others = [dict(r) for r in replies if r.get("role") != "tool"]
    if not tool_replies:
        return others
    contents = [r.get("content") or "" for r in tool_replies]
    if not calls:
        return [{"role": "user", "content": "\n\n".join(map(str, contents))}, *others]
    out = [{"role": "tool", "tool_call_id": call["id"], "content": contents[i] if i < len(contents) else NOT_RUN}
           for i, call in enumerate(calls)]
    if len(contents) > len(calls):
        out[-1]["content"] = "\n\n".join(map(str, [out[-1]["content"], *contents[len(calls):]]))
    return out + others


def chat_messages(messages: Sequence[Mapping[str, Any]], *, reasoning: bool = True) -> list[dict[str, Any]]:
    """An episode's message view (the loop's `Trajectory.messages`, or a conversation) as OpenAI chat
    messages: calls with ids and JSON-string arguments, tool replies with their `tool_call_id`.
    `reasoning=False` leaves out `reasoning_content` (for APIs that refuse the field)."""
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []  # of the last assistant message
    replies: list[Mapping[str, Any]] = []  # tool messages since it
    turn = 0
    for m in messages:
        if m.get("role") == "tool":
            replies.append(m)
            continue
        out += answer_calls(calls, replies)
        replies, calls = [], []
        if m.get("role") == "assistant":
            a = assistant_message(m, enable_thinking=True, turn=turn)
            turn += 1
            if not reasoning:
                del a["reasoning_content"]
            calls = a.get("tool_calls", [])
            out.append(a)
        else:
            out.append(dict(m))
    return out + answer_calls(calls, replies)


# ------------------------------------------------------------------------------------------------ the policy

class ChatClient(Protocol):
    """What `ChatAgentPolicy` needs of a chat endpoint; `OpenAIPolicy` is one."""

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   params: SamplingParams | None = None, **extra: Any) -> ChatOutput: ...


class ChatAgentPolicy:
    """A chat model (native tool calls) as a policy of the agent loop, for evaluation.

    The loop calls `chat_turn` with the episode's message view (never decoded ids); the reply is returned as
    the ids of its M2 text (`assistant_text`, tokenized with our tokenizer), log-probs 0.0, and the message
    itself, which the loop keeps as the turn's view. Malformed or missing calls are the env's business: a
    reply without calls is a final answer, a call with bad arguments gets the env's format error.

    Args:
        client: the chat endpoint, e.g. `OpenAIPolicy(base_url, model)`.
        tokenizer: our tokenizer (the trajectory's ids and token counts are ours, whatever the model's are).
        send_reasoning: send earlier turns' `reasoning_content` back (M2's interleaved thinking); turn off for
            APIs that refuse the field.
        chat_options: extra body fields of every request (e.g. `chat_template_kwargs`).
    """

    def __init__(self, client: ChatClient, tokenizer: Tokenizer, *, send_reasoning: bool = True,
                 policy_version: int = 0, **chat_options: Any) -> None:
        self.client, self.tokenizer = client, tokenizer
        self.send_reasoning = send_reasoning
        self.policy_version = policy_version
        self.chat_options = chat_options
        self.usage: Counter[str] = Counter()  # the server's token counts, summed over every request

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        raise PolicyError("ChatAgentPolicy reads messages, not token ids: run it with m2rl.agent.run_episode / "
                          "arun_episode, which call chat_turn with the episode's messages")

    async def chat_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        params: SamplingParams, enable_thinking: bool) -> PolicyOutput:
        if not messages:
            raise PolicyError("a chat policy needs the prompt as messages: the env must have prompt_messages() "
                              "and tools_spec() (like ToolEnv)")
        turn = sum(m.get("role") == "assistant" for m in messages)
        out = await self.client.chat(chat_messages(messages, reasoning=self.send_reasoning), tools or None,
                                     params, **self.chat_options)
        self.usage.update(out.usage)
        message = chat_output_message(out, enable_thinking, turn)
        ids = list(self.tokenizer.encode(assistant_text(message, enable_thinking)))
        finish = "length" if out.finish_reason == "length" else "stop"
        return PolicyOutput(ids=ids, logprobs=[0.0] * len(ids), finish_reason=finish,
                            policy_version=self.policy_version, message=message, usage=dict(out.usage) or None)

    async def aclose(self) -> None:
        close = getattr(self.client, "aclose", None)
        if close is not None:
            await close()
