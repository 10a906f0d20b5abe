"""Request and response bodies of the HTTP API: OpenAI's completions and chat completions, with the vLLM
extensions that token-in/token-out clients send (`return_tokens_as_token_ids`, `stop_token_ids`, `top_k`,
`skip_special_tokens`, `chat_template_kwargs`, ...), so `agent/openai_policy.py` and the `openai` SDK work
unchanged.

Pydantic validates every field, so a malformed request is a 400 whose message names the field. Unknown
fields are ignored, as vLLM does (SDKs send vendor fields); known fields whose non-default values the server
cannot honour (penalties, logit_bias, best_of, suffix, forced tool choice) are refused by name rather than
silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per token


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)  # None: the rest of the context (vLLM's default)
    temperature: float | None = Field(None, ge=0.0)  # None: 1.0; 0: greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1024)  # choice i samples with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # accepted; byte-level BPE puts no spaces between tokens
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:123" (exact ids, nothing re-tokenized)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(s == "" for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must be non-empty")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and any(i < 0 for i in ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return ids

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported by this server; leave at 0")
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _no_repetition_penalty(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError("repetition_penalty is not supported by this server; leave at 1")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    # A string, a list of strings, a list of token ids (ONE prompt), or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token; 0: the sampled one only
    echo: bool = False  # prepend the prompt (with its log-probs when `logprobs` is set) to each choice
    # vLLM's teacher-forced prompt scoring: each prompt token's log-prob and rank, with this many alternatives
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and any(isinstance(t, int) and t < 0 for t in prompt):
            raise ValueError("token ids must be non-negative")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("only best_of == n (or unset) is supported")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("insertion (suffix) is not supported")
        return suffix

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: strings, or token-id lists (a flat id list is ONE prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[int(x) for x in p]]  # type: ignore[arg-type]  # all ints, checked above
        return list(p)  # type: ignore[arg-type]  # list[str] or list[list[int]]


class ChatMessage(BaseModel):
    """One message, passed to the M2 renderer as sent (extra keys such as `current_date` are kept)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: dict[str, Any]  # kept as sent: the prompt shows its JSON, key order included

    @field_validator("function")
    @classmethod
    def _named(cls, function: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError("function.name must be a non-empty string")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            # pydantic turns a ValueError (not a TypeError) into the 400 that names the field
            raise ValueError("function.parameters must be a JSON schema object")
        return function


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name; wins over max_tokens
    chat_template_kwargs: dict[str, Any] | None = None  # {"enable_thinking": false} opens no <think>

    @field_validator("tool_choice")
    @classmethod
    def _no_forced_call(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(choice, dict):
            raise ValueError("only 'auto' and 'none' are supported (no forced calls)")  # noqa: TRY004 - see above
        return choice

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def enable_thinking(self) -> bool:
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", True))

    def message_dicts(self) -> list[dict[str, Any]]:
        """The messages as the renderer takes them; `developer` is OpenAI's newer name for `system`."""
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_unset=True)
            if d["role"] == "developer":
                d["role"] = "system"
            out.append(d)
        return out

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return None if not self.tools else [t.model_dump(exclude_unset=True) for t in self.tools]


class WeightUpdateRequest(_Body):
    path: str = Field(min_length=1)  # a checkpoint directory or one .safetensors file, on the server's disk
    version: int | None = Field(None, ge=0)  # None: the current version + 1


# ---- responses ---------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (vLLM)
    token_ids: list[int] | None = None  # the sampled ids, exactly
    # vLLM's shape: null for the first token, then {"<id>": {"logprob", "rank", "decoded_token"}} per token
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    policy_version: int  # the weights that sampled the first token (updates land between decode steps)


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    policy_version: int


class ToolCallDelta(ToolCallOut):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    policy_version: int


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    policy_version: int
