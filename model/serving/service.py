"""The serving core between the HTTP bodies and the scheduler.

`Service` owns the served model's identity (name, path, tokenizer), turns request fields into the model's
`SamplingParams`, submits token-id requests, and turns scheduler events into `ChoiceUpdate`s carrying text
(`TextStream`: incremental detokenization, stop strings). Weight updates are read and checked off the
event loop, then handed to the scheduler, which swaps them in between two decode steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from m2rl.model.generation import SamplingParams
from m2rl.model.m2 import M2ForCausalLM
from m2rl.model.serving.errors import ApiError
from m2rl.model.serving.metrics import ServerMetrics
from m2rl.model.serving.protocol import SamplingFields
from m2rl.model.serving.request import Finished, InvalidRequest, Prefilled, Request, RequestHandle, Token
from m2rl.model.serving.scheduler import Scheduler, SchedulerConfig
from m2rl.model.serving.text import TextStream
from m2rl.model.serving.weights import read_weights
from m2rl.model.tokenizer import M2Tokenizer

GREEDY_TEMPERATURE = 1e-5  # at or below: argmax (vLLM's threshold)
TOKEN_ID_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` spelling


@dataclass
class ChoiceUpdate:
    """What one step brought one choice; with `finish_reason` set, also how it ended."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw log-probs of token_ids
    tops: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each token's text starts in the choice's text
    text: str = ""
    policy_version: int = 0
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None  # the stop string or stop token id (not EOS) that ended it
    error: str = ""


@dataclass
class ChoiceSoFar:
    """One choice, accumulated from its updates for a non-streamed answer."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str = ""

    def add(self, update: ChoiceUpdate) -> None:
        self.token_ids += update.token_ids
        self.logprobs += update.logprobs
        self.tops += update.tops
        self.offsets += update.offsets
        self.text += update.text
        if update.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.error = update.finish_reason, update.stop_reason, update.error


class Service:
    def __init__(self, model: M2ForCausalLM, tokenizer: M2Tokenizer, scheduler: Scheduler, model_name: str,
                 model_path: str = "") -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                             f"{model.config.vocab_size}")
        self.model, self.tokenizer, self.scheduler = model, tokenizer, scheduler
        self.model_name, self.model_path = model_name, model_path
        self.metrics = ServerMetrics(scheduler)
        self.created = int(time.time())
        self.weights_lock = asyncio.Lock()  # one update at a time: each is read whole before it is applied

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: SchedulerConfig, model_name: str | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Service:
        from m2rl.model.checkpoint import load_pretrained

        path = Path(path)
        model = load_pretrained(path, dtype=dtype, device=device)
        tokenizer = M2Tokenizer.from_file(path)
        return cls(model, tokenizer, Scheduler(model, config), model_name or path.name, str(path))

    @property
    def policy_version(self) -> int:
        return self.scheduler.policy_version

    def check_model(self, name: str) -> None:
        if name not in (self.model_name, self.model_path):
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}", "model")

    # ---- requests ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def sampling_params(self, req: SamplingFields, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = self.scheduler.config.max_model_len - prompt_len
        if room < 1 and max_tokens is None:
            raise InvalidRequest(f"the prompt has {prompt_len} tokens; the maximum context length is "
                                 f"{self.scheduler.config.max_model_len}", "prompt")
        temperature = 1.0 if req.temperature is None else req.temperature
        greedy = temperature <= GREEDY_TEMPERATURE
        stop_ids = tuple(req.stop_token_ids or ()) + (() if req.ignore_eos else (self.tokenizer.eos_id,))
        return SamplingParams(
            max_tokens=room if max_tokens is None else max_tokens,
            temperature=1.0 if greedy else temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed, stop_ids=tuple(dict.fromkeys(stop_ids)), greedy=greedy)

    def submit(self, requests: Sequence[Request]) -> list[RequestHandle]:
        """Submit all or none: if one is refused (overload), the ones already queued are cancelled."""
        handles: list[RequestHandle] = []
        try:
            for request in requests:
                handles.append(self.scheduler.submit(request))
        except Exception:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def text_stream(self, req: SamplingFields, skip_special_tokens: bool) -> TextStream:
        return TextStream(self.tokenizer.backend, skip_special_tokens, req.stop_strings(),
                          req.include_stop_str_in_output)

    def token_text(self, token_id: int, as_id: bool) -> str:
        return f"{TOKEN_ID_PREFIX}{token_id}" if as_id else self.tokenizer.decode([token_id])

    async def updates(self, handle: RequestHandle, streams: list[TextStream]
                      ) -> AsyncIterator[ChoiceUpdate | Prefilled]:
        """The request's Prefilled event, then ChoiceUpdates until every choice has finished. Leaving early
        (the client went away) cancels the request and frees its rows."""
        stopped: set[int] = set()  # choices ended here by a stop string (the scheduler may still send tokens)
        first_token = True
        try:
            async for event in handle.events():
                if isinstance(event, Prefilled):
                    yield event
                elif isinstance(event, Token):
                    if event.choice in stopped:
                        continue
                    if first_token:
                        self.metrics.ttft.observe(time.monotonic() - handle.submitted_at)
                        first_token = False
                    stream = streams[event.choice]
                    update = ChoiceUpdate(event.choice, [event.token_id], [event.logprob], [event.top],
                                          text=stream.push(event.token_id), policy_version=event.policy_version)
                    update.offsets = stream.offsets[-1:]
                    if stream.stopped_by is not None:
                        stopped.add(event.choice)
                        handle.cancel(event.choice)
                        update.finish_reason, update.stop_reason = "stop", stream.stopped_by
                    yield update
                elif event.choice not in stopped:
                    yield self._finished(event, streams[event.choice])
        finally:
            if not handle.done:
                handle.cancel()

    def _finished(self, event: Finished, stream: TextStream) -> ChoiceUpdate:
        update = ChoiceUpdate(event.choice, text=stream.finish(), policy_version=self.policy_version,
                              finish_reason=event.reason, error=event.error)
        if stream.stopped_by is not None:  # the undecoded tail completed a stop string
            update.finish_reason, update.stop_reason = "stop", stream.stopped_by
        elif event.reason == "stop" and stream.ids and stream.ids[-1] != self.tokenizer.eos_id:
            update.stop_reason = stream.ids[-1]
        return update

    # ---- weights -----------------------------------------------------------------------------------
    async def update_weights(self, path: str, version: int | None) -> int:
        return await self.apply_weights(lambda: read_weights(path, self.model), version)

    async def apply_weights(self, read: Callable[[], Mapping[str, torch.Tensor]], version: int | None) -> int:
        """`read` (off the event loop) builds and checks the whole state dict, then the scheduler swaps it in
        between two steps; returns the new policy version. Every transport of weight_transfer.py ends here."""
        async with self.weights_lock:
            state = await asyncio.to_thread(read)
            return await self.scheduler.update_weights(state, version)


T = TypeVar("T")


async def merge(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(source index, item) from several async iterators as the items come; closing this closes them all."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    done = object()  # a pump's end marker
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(i: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((i, item))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, got = await queue.get()
            if got is done:
                remaining -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield i, got  # type: ignore[misc]  # what pump(i) put: a T
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
