"""The M2 chat format on the server side: the prompt from OpenAI messages, and the model's text back into
OpenAI's message shape (reasoning_content, content, tool_calls), whole or streamed.

Both directions are `m2rl.agent.format` (render and parse, the project's one implementation of
shared/reference/m2-format.md); this file only adapts them to the OpenAI wire shapes.

Streaming cannot parse as it goes without risking a delta it must later take back, so `ChatTextSplitter`
re-parses the text so far at each step and releases only what the final parse will keep: reasoning up to
its trailing newlines (one before `</think>` is a separator), content up to its trailing newline (one
before a tool-call block is a separator). Tool calls are sent whole when the choice ends.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from m2rl.agent.format import (
    EOS,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_OPEN,
    ParsedOutput,
    ToolCall,
    parse,
    render,
)
from m2rl.model.serving.errors import ApiError, error_content
from m2rl.model.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    TokenLogprob,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from m2rl.model.serving.request import Prefilled, Request
from m2rl.model.serving.service import ChoiceSoFar, Service

STREAM_MARKERS = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, EOS)  # the ones that move text between fields


def chat_prompt(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                enable_thinking: bool) -> str:
    """The rendered conversation and the generation prompt (raises RenderError naming the message)."""
    return render(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)


def _partial_marker(text: str) -> int:
    """Length of the longest end of `text` that begins a marker without completing it."""
    if text.endswith(STREAM_MARKERS):  # `[e~[` ends with `[`, which also begins it
        return 0
    return max((k for m in STREAM_MARKERS for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def openai_tool_calls(calls: Sequence[ToolCall]) -> list[ToolCallOut]:
    return [ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}",
                        function=ToolCallFunction(name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)))
            for c in calls]


class ChatTextSplitter:
    """One choice's generated text -> (reasoning, content) deltas that the final parse agrees with."""

    def __init__(self, tools: Sequence[dict[str, Any]] | None, enable_thinking: bool) -> None:
        self.tools, self.enable_thinking = tools, enable_thinking
        self.text = ""
        self.sent_reasoning = ""
        self.sent_content = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        if not delta:
            return "", ""
        return self._release(*self._stable())

    def finish(self) -> tuple[str, str, ParsedOutput]:
        """The final parse (tool calls typed by the request's tool schemas) and what was not yet sent."""
        parsed = parse(self.text, self.tools, enable_thinking=self.enable_thinking)
        reasoning_delta, content_delta = self._release(parsed.reasoning, parsed.content)
        return reasoning_delta, content_delta, parsed

    def _stable(self) -> tuple[str, str]:
        # A marker may arrive in pieces (stop-string hold-back releases text by characters): until it is
        # whole, its beginning is not text.
        text = self.text[:len(self.text) - _partial_marker(self.text)]
        parsed = parse(text, None, enable_thinking=self.enable_thinking)
        thinking = THINK_CLOSE not in text and (self.enable_thinking or text.lstrip("\n").startswith(THINK_OPEN))
        if thinking:
            return parsed.reasoning.rstrip("\n"), ""
        content = parsed.content if TOOL_CALL_OPEN in text else parsed.content.rstrip("\n")
        return parsed.reasoning, content

    def _release(self, reasoning: str, content: str) -> tuple[str, str]:
        # A text that no longer extends what was sent (a late `</think>` without thinking mode) sends nothing
        # more for that field: the non-streamed answer is right, the stream cannot take back a delta.
        r = reasoning[len(self.sent_reasoning):] if reasoning.startswith(self.sent_reasoning) else ""
        c = content[len(self.sent_content):] if content.startswith(self.sent_content) else ""
        self.sent_reasoning += r
        self.sent_content += c
        return r, c


class ChatCompletion:
    """One /v1/chat/completions request from submission to its answer."""

    def __init__(self, service: Service, req: ChatCompletionRequest) -> None:
        service.check_model(req.model)
        self.service, self.req = service, req
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tools = req.tool_dicts()
        # tool_choice "none": the tools are shown, but a call the model writes anyway is not returned.
        self.parse_tools = self.tools if req.tool_choice != "none" else None
        self.enable_thinking = req.enable_thinking()
        self.prompt_ids = service.encode(chat_prompt(req.message_dicts(), self.tools, self.enable_thinking))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else 0
        params = service.sampling_params(req, len(self.prompt_ids), max_tokens)
        [self.handle] = service.submit([Request(self.prompt_ids, params, req.n, top_logprobs=top)])
        # The markers must survive decoding: they are what the parser splits reasoning and tool calls by.
        self.streams = [service.text_stream(req, skip_special_tokens=False) for _ in range(req.n)]
        self.policy_version = service.policy_version

    def cancel(self) -> None:
        """Free whatever the request still holds (idempotent: a finished request holds nothing)."""
        if not self.handle.done:
            self.handle.cancel()

    def _usage(self, completion_tokens: int) -> Usage:
        prompt_tokens = len(self.prompt_ids)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    # ---- whole -------------------------------------------------------------------------------------
    async def response(self) -> ChatCompletionResponse:
        choices = [ChoiceSoFar() for _ in range(self.req.n)]
        async for item in self.service.updates(self.handle, self.streams):
            if isinstance(item, Prefilled):
                self.policy_version = item.policy_version
            else:
                choices[item.index].add(item)
        out = []
        for index, c in enumerate(choices):
            if c.finish_reason == "error":
                raise ApiError(500, f"generation failed: {c.error}")
            parsed = parse(c.text, self.parse_tools, enable_thinking=self.enable_thinking)
            calls = openai_tool_calls(parsed.tool_calls) if self.parse_tools else []
            message = AssistantMessage(content=parsed.content if parsed.content or not calls else None,
                                       reasoning_content=parsed.reasoning or None, tool_calls=calls)
            out.append(ChatChoice(index=index, message=message, logprobs=self._logprobs(c.token_ids, c.logprobs, c.tops),
                                  finish_reason=_finish_reason(c.finish_reason, bool(calls)),
                                  stop_reason=c.stop_reason, token_ids=c.token_ids))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.service.model_name, choices=out,
                                      usage=self._usage(sum(len(c.token_ids) for c in choices)),
                                      policy_version=self.policy_version)

    # ---- streamed ----------------------------------------------------------------------------------
    async def chunks(self) -> AsyncIterator[str]:
        """SSE data lines: the role, then one chunk per token (reasoning_content / content deltas), the tool
        calls and finish reason when a choice ends, usage when asked, `[DONE]`."""
        splitters = [ChatTextSplitter(self.parse_tools, self.enable_thinking) for _ in range(self.req.n)]
        completion_tokens = 0
        for index in range(self.req.n):
            yield self._chunk(ChatStreamChoice(index=index, delta=ChatDelta(role="assistant", content="")))
        async for item in self.service.updates(self.handle, self.streams):
            if isinstance(item, Prefilled):
                self.policy_version = item.policy_version
                continue
            if item.finish_reason == "error":
                yield json.dumps(error_content(500, f"generation failed: {item.error}"))
                continue
            completion_tokens += len(item.token_ids)
            splitter = splitters[item.index]
            reasoning, content = splitter.feed(item.text)
            delta = ChatDelta()
            finish = None
            if item.finish_reason is not None:
                more_reasoning, more_content, parsed = splitter.finish()
                reasoning, content = reasoning + more_reasoning, content + more_content
                calls = openai_tool_calls(parsed.tool_calls) if self.parse_tools else []
                delta.tool_calls = [ToolCallDelta(index=i, **c.model_dump()) for i, c in enumerate(calls)] or None
                finish = _finish_reason(item.finish_reason, bool(calls))
            delta.reasoning_content, delta.content = reasoning or None, content or None
            yield self._chunk(ChatStreamChoice(index=item.index, delta=delta,
                                               logprobs=self._logprobs(item.token_ids, item.logprobs, item.tops),
                                               finish_reason=finish, stop_reason=item.stop_reason,
                                               token_ids=item.token_ids or None))
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            yield ChatCompletionChunk(id=self.id, created=self.created, model=self.service.model_name, choices=[],
                                      usage=self._usage(completion_tokens),
                                      policy_version=self.policy_version).model_dump_json(exclude_none=True)
        yield "[DONE]"

    def _chunk(self, choice: ChatStreamChoice) -> str:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.service.model_name, choices=[choice],
                                   policy_version=self.policy_version).model_dump_json(exclude_none=True)

    def _logprobs(self, ids: list[int], lps: list[float],
                  tops: list[tuple[tuple[int, float], ...]]) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        as_id, text = self.req.return_tokens_as_token_ids, self.service.token_text

        def entry(token_id: int, logprob: float) -> TopLogprob:
            token = text(token_id, as_id)
            return TopLogprob(token=token, logprob=logprob, bytes=list(text(token_id, False).encode()))

        return ChatLogprobs(content=[
            TokenLogprob(**entry(t, lp).model_dump(), top_logprobs=[entry(a, v) for a, v in alts])
            for t, lp, alts in zip(ids, lps, tops)])


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason
