"""A generation request as the scheduler sees it, and what its submitter gets back.

    handle = scheduler.submit(Request(prompt_ids, params, n=2, top_logprobs=5))
    async for event in handle.events():   # Prefilled, then Token per sampled id, then Finished per choice
        ...
    handle.cancel()                        # the client went away: its rows are freed at the next step

Token ids in, token ids out. Each Token carries its raw log-prob (temperature 1, no filtering: what the
learner recomputes, vLLM's default `raw_logprobs`) and the version of the weights that sampled it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from m2rl.model.generation import SamplingParams


class InvalidRequest(ValueError):
    """A request that can never be served as given; `param` names the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(RuntimeError):
    """The waiting queue is full: try again later (HTTP 429)."""


class SchedulerClosed(RuntimeError):
    """The scheduler is not running (not started, stopped, or its task died): HTTP 503."""


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    params: SamplingParams  # stop_ids are complete here (the caller adds EOS unless it is ignored)
    n: int = 1  # independent choices; with a seed, choice i samples with seed + i
    top_logprobs: int = 0  # alternatives (id, raw log-prob) returned with each sampled token
    prompt_logprobs: int | None = None  # score the prompt in the prefill, with this many alternatives


@dataclass(frozen=True)
class PromptToken:
    """How the model scores prompt[t] given prompt[:t] (teacher forcing)."""

    logprob: float
    rank: int  # 1 + the number of tokens the model found more likely
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Prefilled:
    """The first event of every admitted request."""

    prompt_logprobs: list[PromptToken] | None  # for prompt[1:], when asked for
    policy_version: int


@dataclass(frozen=True)
class Token:
    choice: int
    token_id: int
    logprob: float  # raw: under the policy at temperature 1
    top: tuple[tuple[int, float], ...]  # the request's top_logprobs most likely (id, raw log-prob)
    policy_version: int


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: Literal["stop", "length", "abort", "error"]
    error: str = ""


Event = Prefilled | Token | Finished

_ids = itertools.count()


class RequestHandle:
    """What `submit` returns: the request's events, and `cancel` to free its rows early."""

    def __init__(self, request: Request, wake: Callable[[], None]) -> None:
        self.request = request
        self.id = next(_ids)
        self.submitted_at = time.monotonic()
        self.cancelled: set[int] = set()  # choices the caller no longer wants
        self._wake = wake  # tells the scheduler there is news (a cancellation)
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._finished: set[int] = set()  # choices whose Finished was pushed (scheduler side)
        self._open = set(range(request.n))  # choices whose Finished was not yet read (consumer side)

    @property
    def row_tokens(self) -> int:
        """Tokens one choice may hold: its reservation against the budget."""
        return len(self.request.prompt_ids) + self.request.params.max_tokens

    @property
    def reserved_tokens(self) -> int:
        if self.request.params.max_tokens == 0:  # scoring only: one prompt, no rows
            return len(self.request.prompt_ids)
        return self.request.n * self.row_tokens

    @property
    def done(self) -> bool:
        return len(self._finished) == self.request.n

    def cancel(self, choice: int | None = None) -> None:
        """Stop one choice (a stop string was seen) or the whole request (the client went away)."""
        self.cancelled.update(range(self.request.n) if choice is None else (choice,))
        self._wake()

    async def events(self) -> AsyncIterator[Event]:
        """Prefilled, then Token events, until every choice has Finished (each exactly once)."""
        while self._open:
            event = await self._events.get()
            if isinstance(event, Finished):
                self._open.discard(event.choice)
            yield event

    # The scheduler's side (the loop's thread only).
    def _push(self, event: Event) -> None:
        self._events.put_nowait(event)

    def _finish(self, choice: int, reason: Literal["stop", "length", "abort", "error"], error: str = "") -> bool:
        """Push the choice's Finished unless it was; True when this finished the whole request."""
        if choice in self._finished:
            return False
        self._finished.add(choice)
        self._push(Finished(choice, reason, error))
        return self.done
