"""POST /v1/completions: text or token-id prompts in; text, token ids and raw log-probs out, whole or streamed.

The shape is OpenAI's legacy completions with vLLM's token-exact extensions, as `agent/openai_policy.py`
reads them: `logprobs.tokens` spelled `"token_id:123"` under `return_tokens_as_token_ids`, `token_ids` on
every choice, and `echo` with `logprobs` scoring the prompt itself (`token_logprobs[0]` is null).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from m2rl.model.serving.errors import ApiError, error_content
from m2rl.model.serving.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from m2rl.model.serving.request import Prefilled, PromptToken, Request
from m2rl.model.serving.service import ChoiceSoFar, ChoiceUpdate, Service, merge
from m2rl.model.serving.text import TextStream


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # decoded as the choices' text is (what `echo` prepends)
    offsets: list[int]


class Completion:
    """One /v1/completions request from submission to its answer."""

    def __init__(self, service: Service, req: CompletionRequest) -> None:
        service.check_model(req.model)
        self.service, self.req = service, req
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = [self._prompt(p) for p in req.prompts()]
        wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
        requests = [Request(p.ids, service.sampling_params(req, len(p.ids), req.max_tokens), req.n,
                            top_logprobs=req.logprobs or 0, prompt_logprobs=max(wanted) if wanted else None)
                    for p in self.prompts]
        self.handles = service.submit(requests)
        self.streams = [[service.text_stream(req, req.skip_special_tokens) for _ in range(req.n)]
                        for _ in self.handles]
        self.prompt_scores: list[list[PromptToken]] = [[] for _ in self.handles]
        self.policy_version = service.policy_version

    def cancel(self) -> None:
        """Free whatever the request still holds (idempotent: finished requests hold nothing)."""
        for handle in self.handles:
            if not handle.done:
                handle.cancel()

    def _prompt(self, prompt: str | list[int]) -> _Prompt:
        ids = self.service.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        if not self.req.echo:
            return _Prompt(ids, "", [])
        stream = TextStream(self.service.tokenizer.backend, self.req.skip_special_tokens)
        text = "".join(stream.push(t) for t in ids) + stream.finish()
        return _Prompt(ids, text, stream.offsets)

    def _updates(self) -> AsyncIterator[tuple[int, ChoiceUpdate | Prefilled]]:
        return merge([self.service.updates(h, s) for h, s in zip(self.handles, self.streams)])

    def _on_prefill(self, i: int, event: Prefilled) -> None:
        self.prompt_scores[i] = event.prompt_logprobs or []
        self.policy_version = min(self.policy_version, event.policy_version)

    # ---- whole -------------------------------------------------------------------------------------
    async def response(self) -> CompletionResponse:
        n = self.req.n
        choices = [[ChoiceSoFar() for _ in range(n)] for _ in self.handles]
        async for i, item in self._updates():
            if isinstance(item, Prefilled):
                self._on_prefill(i, item)
            else:
                choices[i][item.index].add(item)
        out = []
        for i, row in enumerate(choices):
            for j, c in enumerate(row):
                if c.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {c.error}")
                out.append(self._choice(i * n + j, i, c))
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for row in choices for c in row)
        return CompletionResponse(id=self.id, created=self.created, model=self.service.model_name, choices=out,
                                  usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens),
                                  policy_version=self.policy_version)

    def _choice(self, index: int, prompt_index: int, c: ChoiceSoFar) -> CompletionChoice:
        prompt = self.prompts[prompt_index]
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = self._logprobs(c.token_ids, c.logprobs, c.tops, [o + len(prompt.text) for o in c.offsets])
            if self.req.echo:
                logprobs = _concat(self._prompt_part(prompt_index), logprobs)
        return CompletionChoice(index=index, text=prompt.text + c.text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason, token_ids=c.token_ids,
                                prompt_logprobs=self._vllm_prompt_logprobs(prompt_index))

    # ---- streamed ----------------------------------------------------------------------------------
    async def chunks(self) -> AsyncIterator[str]:
        """SSE data lines: one chunk per token of each choice, the finish, usage when asked, `[DONE]`."""
        n, completion_tokens = self.req.n, 0
        async for i, item in self._updates():
            if isinstance(item, Prefilled):
                self._on_prefill(i, item)
                if self.req.echo or self.req.prompt_logprobs is not None:
                    logprobs = self._prompt_part(i) if self.req.echo and self.req.logprobs is not None else None
                    for j in range(n):
                        yield self._chunk(CompletionChoice(index=i * n + j, text=self.prompts[i].text,
                                                           logprobs=logprobs,
                                                           prompt_logprobs=self._vllm_prompt_logprobs(i)))
                continue
            if item.finish_reason == "error":
                yield json.dumps(error_content(500, f"generation failed: {item.error}"))
                continue
            completion_tokens += len(item.token_ids)
            logprobs = None
            if self.req.logprobs is not None:
                logprobs = self._logprobs(item.token_ids, item.logprobs, item.tops,
                                          [o + len(self.prompts[i].text) for o in item.offsets])
            yield self._chunk(CompletionChoice(index=i * n + item.index, text=item.text, logprobs=logprobs,
                                               finish_reason=item.finish_reason, stop_reason=item.stop_reason,
                                               token_ids=item.token_ids))
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            prompt_tokens = sum(len(p.ids) for p in self.prompts)
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
            yield CompletionChunk(id=self.id, created=self.created, model=self.service.model_name, choices=[],
                                  usage=usage, policy_version=self.policy_version).model_dump_json(exclude_none=True)
        yield "[DONE]"

    def _chunk(self, choice: CompletionChoice) -> str:
        return CompletionChunk(id=self.id, created=self.created, model=self.service.model_name, choices=[choice],
                               policy_version=self.policy_version).model_dump_json(exclude_none=True)

    # ---- log-probs ---------------------------------------------------------------------------------
    def _logprobs(self, ids: list[int], lps: list[float], tops: list[tuple[tuple[int, float], ...]],
                  offsets: list[int]) -> CompletionLogprobs:
        as_id, text = self.req.return_tokens_as_token_ids, self.service.token_text
        tokens = [text(t, as_id) for t in ids]
        # vLLM lists the sampled token among the alternatives, so there are up to logprobs + 1 entries.
        top: list[dict[str, float] | None] = [{tok: lp, **{text(a, as_id): v for a, v in alts}}
                                              for tok, lp, alts in zip(tokens, lps, tops)]
        return CompletionLogprobs(text_offset=offsets, token_logprobs=list(lps), tokens=tokens, top_logprobs=top)

    def _prompt_part(self, prompt_index: int) -> CompletionLogprobs:
        """The echoed prompt's share of `logprobs` (its first token has none)."""
        prompt, scores = self.prompts[prompt_index], self.prompt_scores[prompt_index]
        as_id, text = self.req.return_tokens_as_token_ids, self.service.token_text
        tokens = [text(t, as_id) for t in prompt.ids]
        k = self.req.logprobs or 0
        top: list[dict[str, float] | None] = [None]
        top += [{tok: s.logprob, **{text(a, as_id): v for a, v in s.top[:k]}} for tok, s in zip(tokens[1:], scores)]
        return CompletionLogprobs(text_offset=prompt.offsets, token_logprobs=[None, *(s.logprob for s in scores)],
                                  tokens=tokens, top_logprobs=top)

    def _vllm_prompt_logprobs(self, prompt_index: int) -> list[dict[str, dict[str, Any]] | None] | None:
        k = self.req.prompt_logprobs
        if k is None:
            return None
        as_id, text = self.req.return_tokens_as_token_ids, self.service.token_text
        out: list[dict[str, dict[str, Any]] | None] = [None]
        for token, score in zip(self.prompts[prompt_index].ids[1:], self.prompt_scores[prompt_index]):
            entry = {str(a): {"logprob": v, "rank": rank, "decoded_token": text(a, as_id)}
                     for rank, (a, v) in enumerate(score.top[:k], start=1)}
            entry[str(token)] = {"logprob": score.logprob, "rank": score.rank, "decoded_token": text(token, as_id)}
            out.append(entry)
        return out



def _concat(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)
