"""OpenAIPolicy: a policy served by any OpenAI-compatible HTTP server (vLLM is the reference).

Two modes:
- token-in/token-out (`generate`) through `/v1/completions` with a token-id prompt, `logprobs: 1` and
  vLLM's `return_tokens_as_token_ids: true`, so the sampled ids come back exactly (as `"token_id:123"`
  strings) with their log-probs and nothing is re-tokenized. This is what RL rollouts use.
- chat (`chat`) through `/v1/chat/completions` with native tool calls, for evaluating hosted models
  whose tokenizer we do not have.

One pooled `httpx.AsyncClient` per event loop, a semaphore capping requests in flight, retries with
exponential backoff (and `Retry-After`) on connection errors, timeouts, 408, 429 and 5xx, and an
immediate `PolicyRequestError` naming the status and the server's message on any other 4xx. With a
`server_check` (a server this process started, `VLLMServer.policy()`), a failed attempt first asks whether
the server is dead, so its death is reported at once with its log tail instead of as a `ConnectError`
after every retry.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
from m2rl.model.tokenizer import THINK_CLOSE, THINK_OPEN
from m2rl.agent.policy import (
    PolicyOutput,
    PolicyRequestError,
    PolicyResponseError,
    PolicyUnavailableError,
    SamplingParams,
    validate_prompt_ids,
)

# 408/429 are client-side codes but mean "try again later"; every other 4xx is a caller bug.
RETRYABLE_STATUS = frozenset({408, 429})
TOKEN_ID_PREFIX = "token_id:"


@dataclass(frozen=True)
class ChatToolCall:
    id: str
    name: str
    arguments: dict[str, Any]
    error: str | None = None  # set when the server's `arguments` string was not a JSON object


@dataclass(frozen=True)
class ChatOutput:
    content: str
    reasoning: str
    tool_calls: list[ChatToolCall]
    usage: dict[str, int]
    finish_reason: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def normalize_base_url(base_url: str) -> str:
    """`http://host:8000` -> `http://host:8000/v1`; a URL that already has a path is kept as given."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError("base_url must be a non-empty string like 'http://localhost:8000/v1'")
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must start with http:// or https:// and name a host, got {base_url!r}")
    return url if parts.path else url + "/v1"


def parse_token_id(token: str) -> int:
    """vLLM's `return_tokens_as_token_ids` renders each token as `"token_id:123"`."""
    if not isinstance(token, str) or not token.startswith(TOKEN_ID_PREFIX):
        raise PolicyResponseError(
            f"expected a token as 'token_id:<int>', got {token!r}: the server ignored "
            "return_tokens_as_token_ids (token-in/token-out needs a vLLM-compatible server)"
        )
    try:
        return int(token[len(TOKEN_ID_PREFIX):])
    except ValueError:
        raise PolicyResponseError(f"malformed token id string {token!r}") from None


def server_message(resp: httpx.Response) -> str:
    """The human-readable error a server put in its body (OpenAI, vLLM and FastAPI shapes), else the text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:1000] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return body[key] if isinstance(body[key], str) else json.dumps(body[key])
    return json.dumps(body)[:1000]


def split_inline_reasoning(content: str) -> tuple[str, str]:
    """Servers without a reasoning parser return M2's `...reasoning</think>\\n\\ncontent` as content."""
    if THINK_CLOSE not in content:
        return "", content
    before, _, after = content.rpartition(THINK_CLOSE)
    reasoning = before.rsplit(THINK_OPEN, 1)[-1]
    return reasoning.strip("\n"), after.strip("\n")


class OpenAIPolicy:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_concurrency: int = 64,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 16.0,
        policy_version: int = 0,
        extra_body: dict[str, Any] | None = None,
        chat_max_tokens_key: str = "max_tokens",
        transport: httpx.AsyncBaseTransport | None = None,
        server_check: Callable[[], None] | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError("model must be the served model's name (a non-empty string)")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("max_retries, backoff_s and max_backoff_s must be >= 0")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.api_key = api_key
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.policy_version = policy_version
        self.extra_body = dict(extra_body or {})
        self.chat_max_tokens_key = chat_max_tokens_key
        self._transport = transport  # tests inject httpx.MockTransport here
        # Raises (e.g. VLLMServerError with the log tail) when the server is known dead; None: retry blindly.
        self.server_check = server_check
        # The client and semaphore belong to one event loop; they are rebuilt if used from another.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self.stats = {"requests": 0, "retries": 0}

    # -- connection management -------------------------------------------------------------------

    def _ensure_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._client.is_closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.max_concurrency,
                                  max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=headers, limits=limits,
                                             transport=self._transport)
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        assert self._semaphore is not None
        return self._client, self._semaphore

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client, self._semaphore, self._loop = None, None, None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def set_policy_version(self, version: int) -> None:
        """Call after the server was given new weights (e.g. restarted on a new checkpoint)."""
        self.policy_version = int(version)

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass  # an HTTP-date Retry-After: fall back to our own schedule
        # Full jitter keeps many rollout workers from retrying in lock-step against a recovering server.
        return random.uniform(0.5, 1.0) * min(self.backoff_s * 2**attempt, self.max_backoff_s)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to `base_url + path` with the retry policy; returns the decoded JSON object."""
        client, semaphore = self._ensure_client()
        url = self.base_url + path
        last_error = ""
        async with semaphore:
            for attempt in range(self.max_retries + 1):
                retry_after = None
                self.stats["requests"] += 1
                try:
                    resp = await client.post(url, json=body)
                except httpx.TransportError as e:  # connect/read errors and timeouts
                    last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                else:
                    if resp.status_code < 400:
                        try:
                            data = resp.json()
                        except ValueError:
                            raise PolicyResponseError(f"{url} returned non-JSON: {resp.text[:300]!r}") from None
                        if not isinstance(data, dict):
                            raise PolicyResponseError(f"{url} returned JSON that is not an object: {data!r:.300}")
                        return data
                    message = server_message(resp)
                    if resp.status_code < 500 and resp.status_code not in RETRYABLE_STATUS:
                        raise PolicyRequestError(resp.status_code, message, url)
                    last_error = f"HTTP {resp.status_code}: {message}"
                    retry_after = resp.headers.get("retry-after")
                if self.server_check is not None:
                    await asyncio.to_thread(self.server_check)  # blocking HTTP + wait: off the event loop
                if attempt < self.max_retries:
                    self.stats["retries"] += 1
                    await asyncio.sleep(self._backoff(attempt, retry_after))
        raise PolicyUnavailableError(f"{url} failed after {self.max_retries + 1} attempts; last error: {last_error}")

    # -- token-in / token-out ----------------------------------------------------------------------

    def completion_body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt_ids,  # a flat list of ints is ONE token-id prompt in the OpenAI API
            "max_tokens": params.max_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
            "n": 1,
            "stream": False,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
            # Markers like `[e~[` must survive in any text the server also returns.
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
        }
        if params.top_k and params.top_k > 0 and not params.greedy:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop_ids:
            body["stop_token_ids"] = [int(t) for t in params.stop_ids]
        body.update(self.extra_body)
        return body

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        prompt_ids = validate_prompt_ids(prompt_ids)
        version = self.policy_version  # the weights serving this request, read before it is sent
        data = await self.post("/completions", self.completion_body(prompt_ids, params))
        return parse_completion(data, version)

    async def prompt_logprobs(self, prompt_ids: list[int]) -> list[float]:
        """log pi(x_t | x_<t) for t = 1 .. len-1 of a token-id prompt, teacher-forced (vLLM's `prompt_logprobs`):
        the generator's side of the weight-sync parity probe (rl/parity.py)."""
        prompt_ids = validate_prompt_ids(prompt_ids)
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0.0, "n": 1,
                "prompt_logprobs": 0}  # 0: only each prompt token's own log-prob, no top-k alternatives
        return parse_prompt_logprobs(await self.post("/completions", body), prompt_ids)

    # -- chat with native tool calls ---------------------------------------------------------------

    async def chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        params: SamplingParams | None = None,
        **extra: Any,
    ) -> ChatOutput:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False}
        if tools:
            body["tools"] = tools
        if params is not None:
            body[self.chat_max_tokens_key] = params.max_tokens
            body["temperature"] = 0.0 if params.greedy else params.temperature
            if not params.greedy and params.top_p < 1.0:
                body["top_p"] = params.top_p
            if params.seed is not None:
                body["seed"] = params.seed
        body.update(self.extra_body)
        body.update(extra)
        return parse_chat(await self.post("/chat/completions", body))


def parse_completion(data: dict[str, Any], policy_version: int) -> PolicyOutput:
    """Turn a `/v1/completions` body (logprobs + token-id strings) into a PolicyOutput."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise PolicyResponseError(f"completion response has no choices: {json.dumps(data)[:300]}")
    choice = choices[0]
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or "tokens" not in lp or "token_logprobs" not in lp:
        raise PolicyResponseError("completion response has no logprobs.tokens/token_logprobs "
                                  "(the server must support `logprobs` on /v1/completions)")
    ids = [parse_token_id(t) for t in lp["tokens"]]
    logprobs = lp["token_logprobs"]
    if len(logprobs) != len(ids) or any(x is None for x in logprobs):
        raise PolicyResponseError(f"got {len(ids)} tokens but log-probs {logprobs!r:.200}")
    # Newer vLLM can also return the ids directly; when it does they must agree.
    if isinstance(choice.get("token_ids"), list) and list(choice["token_ids"]) != ids:
        raise PolicyResponseError("choice.token_ids disagrees with logprobs.tokens")
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise PolicyResponseError(f"unexpected finish_reason {finish!r} (request aborted by the server?)")
    return PolicyOutput(ids=ids, logprobs=[float(x) for x in logprobs], finish_reason=finish,
                        policy_version=policy_version)


def parse_prompt_logprobs(data: dict[str, Any], prompt_ids: list[int]) -> list[float]:
    """The log-prob of each prompt token after the first from a `/v1/completions` body with `prompt_logprobs`
    (vLLM: one `{"<id>": {"logprob": ...}}` per position, null for the first)."""
    choices = data.get("choices")
    entries = choices[0].get("prompt_logprobs") if isinstance(choices, list) and choices else None
    if not isinstance(entries, list) or len(entries) != len(prompt_ids):
        raise PolicyResponseError("completion response has no prompt_logprobs for every prompt token (the server "
                                  f"must support vLLM's `prompt_logprobs`): {json.dumps(data)[:300]}")
    out: list[float] = []
    for position, (token, entry) in enumerate(zip(prompt_ids[1:], entries[1:]), start=1):
        logprob = entry.get(str(token), {}).get("logprob") if isinstance(entry, dict) else None
        if not isinstance(logprob, (int, float)):
            raise PolicyResponseError(f"prompt_logprobs[{position}] has no log-prob of token {token}: {entry!r:.200}")
        out.append(float(logprob))
    return out


def parse_chat(data: dict[str, Any]) -> ChatOutput:
    """Turn a `/v1/chat/completions` body into a ChatOutput; malformed tool arguments become `error`s."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0].get("message"), dict):
        raise PolicyResponseError(f"chat response has no choices[0].message: {json.dumps(data)[:300]}")
    msg = choices[0]["message"]
    content = msg.get("content") or ""
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
    if not reasoning:
        reasoning, content = split_inline_reasoning(content)
    calls: list[ChatToolCall] = []
    for i, tc in enumerate(msg.get("tool_calls") or []):
        fn = tc.get("function") or {}
        raw_args = fn.get("arguments", {})
        args: dict[str, Any] = {}
        error = None
        if isinstance(raw_args, dict):
            args = raw_args
        else:
            try:
                decoded = json.loads(raw_args or "{}")
            except (TypeError, ValueError) as e:
                error = f"arguments of tool call {fn.get('name')!r} are not valid JSON ({e}): {raw_args!r:.200}"
            else:
                if isinstance(decoded, dict):
                    args = decoded
                else:
                    error = f"arguments of tool call {fn.get('name')!r} are not a JSON object: {raw_args!r:.200}"
        calls.append(ChatToolCall(id=str(tc.get("id") or f"call_{i}"), name=str(fn.get("name") or ""),
                                  arguments=args, error=error))
    usage = {k: int(v) for k, v in (data.get("usage") or {}).items() if isinstance(v, int)}
    return ChatOutput(content=content, reasoning=reasoning, tool_calls=calls, usage=usage,
                      finish_reason=str(choices[0].get("finish_reason") or ""), raw=data)
