"""Continuous batching over M2ForCausalLM: requests join and leave the running decode batch every step.

One asyncio task (`Scheduler._run`) owns the model. Each iteration, between two model calls, it
  1. applies a pending weight update (a step never sees half-old, half-new weights),
  2. frees the rows of cancelled requests,
  3. admits waiting requests, first come first served, while rows and the token budget allow, and
     prefills them as one right-padded batch (each samples its first token there),
  4. runs one decode step over every live row and hands each request its token.
The model calls run in a worker thread (`asyncio.to_thread`) so the event loop keeps serving HTTP; all
bookkeeping happens on the loop between calls, so the thread and the loop never touch the same state.

Admission control: a sequence reserves prompt + max_tokens tokens of the budget `max_tokens_in_flight`
for its life (the most it can hold), and a request of n choices is admitted whole or not at all. What
does not fit waits in a FIFO queue of at most `max_queue` requests; beyond that `submit` raises
`Overloaded` (HTTP 429). A request that could never fit is refused at once (`InvalidRequest`).

Token ids in, token ids out (request.py: the Request and the events it gets back); text, stop strings and
the chat format belong to `service.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from m2rl.model.generation import SamplingParams, use_cuda_graphs
from m2rl.model.graph_decode import GraphDecoder
from m2rl.model.m2 import M2ForCausalLM
from m2rl.model.sampling import sample_from_logits, sampling_logits
from m2rl.model.serving.batch_cache import BatchCache
from m2rl.model.serving.request import (
    InvalidRequest,
    Overloaded,
    Prefilled,
    PromptToken,
    Request,
    RequestHandle,
    SchedulerClosed,
    Token,
)

log = logging.getLogger(__name__)

Sampled = tuple[int, float, tuple[tuple[int, float], ...]]  # (token id, raw log-prob, top alternatives)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16
    """Sequences decoded together in one step: the rows of the KV cache."""
    max_model_len: int = 4096
    """Prompt + max_tokens of one sequence: the columns of the KV cache."""
    max_tokens_in_flight: int = 0
    """Token budget: the sum of prompt + max_tokens over admitted sequences. 0: max_batch * max_model_len."""
    max_queue: int = 256
    """Requests waiting for admission; one more is refused with Overloaded."""
    max_prefill_tokens: int = 8192
    """Prompt tokens prefilled between two decode steps (the first request is always taken): bounds how
    long new arrivals stall the running batch."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_model_len", "max_queue", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_in_flight < 0:
            raise ValueError(f"max_tokens_in_flight must be >= 0, got {self.max_tokens_in_flight}")

    @property
    def token_budget(self) -> int:
        return self.max_tokens_in_flight or self.max_batch * self.max_model_len


@dataclass
class _Row:
    """One sequence (a choice of a request) in the running batch."""

    handle: RequestHandle
    choice: int
    generator: torch.Generator | None  # its own when seeded: the output does not depend on the batch
    produced: int = 0
    last_id: int = -1
    finish_reason: Literal["stop", "length"] | None = None

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_batches: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    step_errors: int = 0


@dataclass
class _WeightUpdate:
    state_dict: Mapping[str, torch.Tensor]
    version: int | None
    done: asyncio.Future[int] = field(repr=False)


class Scheduler:
    def __init__(self, model: M2ForCausalLM, config: SchedulerConfig, policy_version: int = 0) -> None:
        c = model.config
        if config.max_model_len > c.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{c.max_position_embeddings}")
        self.model, self.config = model, config
        self.cache = BatchCache.allocate(c.num_hidden_layers, config.max_batch, c.num_key_value_heads,
                                         config.max_model_len, c.head_dim, model.dtype, model.device)
        # CUDA decode steps replay captured graphs over the same cache tensors; weight updates load in place.
        self._graphs = (GraphDecoder(model, self.cache.k, self.cache.v) if use_cuda_graphs(model.device)
                        else None)
        self.rows: list[_Row] = []  # rows[i] lives in row i of the cache
        self.waiting: deque[RequestHandle] = deque()
        self.reserved_tokens = 0
        self.policy_version = policy_version
        self.stats = SchedulerStats()
        # Unseeded sampling shares one generator, itself seeded from the OS (no two servers alike).
        self._generator = torch.Generator(device=model.device)
        self._generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._updates: list[_WeightUpdate] = []
        self._wakeup: asyncio.Event | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup, self._stopping = asyncio.Event(), False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="m2rl-serve-scheduler")

    async def stop(self) -> None:
        """End the loop at the next step boundary (a step in its thread is never cut off), then end every
        request still held with `abort`."""
        if self._task is not None:
            self._stopping = True
            self._wake()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._fail_all("abort", "the server is shutting down")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    # ---- requests ----------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        if not self.running:
            raise SchedulerClosed("the scheduler is not running")
        self._check(request)
        if len(self.waiting) >= self.config.max_queue:
            raise Overloaded(f"{len(self.waiting)} requests are waiting (max_queue {self.config.max_queue})")
        handle = RequestHandle(request, self._wake)
        self.waiting.append(handle)
        self._wake()
        return handle

    def _check(self, request: Request) -> None:
        c, prompt, max_tokens = self.config, request.prompt_ids, request.params.max_tokens
        if not prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        if request.n > c.max_batch:
            raise InvalidRequest(f"n = {request.n} exceeds the server's max batch {c.max_batch}", "n")
        if len(prompt) + max_tokens > c.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                 f"maximum context length {c.max_model_len}", "max_tokens")
        need = request.n * (len(prompt) + max_tokens)
        if need > c.token_budget:
            raise InvalidRequest(f"n * (prompt + max_tokens) = {need} tokens exceeds the server's token budget "
                                 f"{c.token_budget}", "max_tokens")

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        """Load a validated state dict between two steps; returns the new policy version (default +1)."""
        if not self.running:
            raise SchedulerClosed("the scheduler is not running")
        update = _WeightUpdate(state_dict, version, asyncio.get_running_loop().create_future())
        self._updates.append(update)
        self._wake()
        return await update.done

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ---- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wakeup is not None
        try:
            while not self._stopping:
                if not (self.rows or self.waiting or self._updates):
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._apply_weight_updates()
                self._drop_cancelled()
                admitted = self._admit()
                if admitted:
                    await self._prefill(admitted)
                if self.rows:
                    await self._decode()
                # Yield even when the steps were instant, so handlers and cancellations get their turn.
                await asyncio.sleep(0)
        except Exception as exc:  # a bug in the bookkeeping: no request may wait forever on a dead loop
            log.exception("the scheduler loop died")
            self._fail_all("error", f"the scheduler stopped: {type(exc).__name__}: {exc}")
            raise

    def _fail_all(self, reason: Literal["abort", "error"], error: str) -> None:
        while self.waiting:
            self._abort(self.waiting.popleft(), reason, error)
        self._retire(range(len(self.rows)), reason, error)
        for update in self._updates:
            if not update.done.done():
                update.done.set_exception(SchedulerClosed(error))
        self._updates.clear()

    async def _apply_weight_updates(self) -> None:
        while self._updates:
            update = self._updates.pop(0)
            try:
                await asyncio.to_thread(self._load_weights, update.state_dict)
            except Exception as exc:  # noqa: BLE001 - the caller gets the error; serving goes on
                if not update.done.done():  # the caller may have gone away meanwhile
                    update.done.set_exception(exc)
                continue
            self.policy_version = self.policy_version + 1 if update.version is None else int(update.version)
            if not update.done.done():
                update.done.set_result(self.policy_version)

    def _load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state_dict, strict=True)

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self.waiting if len(h.cancelled) == h.request.n]:
            self.waiting.remove(handle)
            self._abort(handle)
        gone = [i for i, row in enumerate(self.rows) if row.choice in row.handle.cancelled]
        if gone:
            self._retire(gone, "abort")

    def _abort(self, handle: RequestHandle, reason: Literal["abort", "error"] = "abort", error: str = "") -> None:
        """End a request that holds no rows (waiting, or failed in its prefill)."""
        for choice in range(handle.request.n):
            if handle._finish(choice, reason, error):
                self.stats.requests_aborted += 1

    def _admit(self) -> list[RequestHandle]:
        admitted: list[RequestHandle] = []
        rows, prefill_tokens = len(self.rows), 0
        while self.waiting:
            handle = self.waiting[0]
            request = handle.request
            n_rows = request.n if request.params.max_tokens > 0 else 0
            if rows + n_rows > self.config.max_batch:
                break
            if self.reserved_tokens + handle.reserved_tokens > self.config.token_budget:
                break
            if admitted and prefill_tokens + len(request.prompt_ids) > self.config.max_prefill_tokens:
                break
            self.waiting.popleft()
            self.reserved_tokens += handle.reserved_tokens
            rows += n_rows
            prefill_tokens += len(request.prompt_ids)
            admitted.append(handle)
        return admitted

    def _new_rows(self, handle: RequestHandle) -> list[_Row]:
        request = handle.request
        if request.params.max_tokens == 0:
            return []
        rows = []
        for choice in range(request.n):
            generator = None
            if request.params.seed is not None and not request.params.greedy:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(request.params.seed + choice)
            rows.append(_Row(handle, choice, generator))
        return rows

    async def _prefill(self, admitted: list[RequestHandle]) -> None:
        new_rows = [self._new_rows(h) for h in admitted]
        version = self.policy_version
        try:
            prompt_lps, sampled = await asyncio.to_thread(self._prefill_step, admitted, new_rows, len(self.rows))
        except Exception as exc:
            log.exception("prefill failed")
            self.stats.step_errors += 1
            for handle in admitted:
                self.reserved_tokens -= handle.reserved_tokens
                self._abort(handle, "error", f"{type(exc).__name__}: {exc}")
            return
        self.stats.prefill_batches += 1
        for handle, rows, lps in zip(admitted, new_rows, prompt_lps):
            self.stats.prompt_tokens += len(handle.request.prompt_ids)
            handle._push(Prefilled(lps, version))
            if not rows:  # max_tokens == 0: the prompt was only scored
                self.reserved_tokens -= handle.reserved_tokens
                for choice in range(handle.request.n):
                    self.stats.requests_finished += handle._finish(choice, "length")
            self.rows.extend(rows)
        self._deliver([row for rows in new_rows for row in rows], sampled, version)

    async def _decode(self) -> None:
        version = self.policy_version
        rows = list(self.rows)
        try:
            sampled = await asyncio.to_thread(self._decode_step, rows)
        except Exception as exc:
            log.exception("decode step failed")
            self.stats.step_errors += 1
            self._retire(range(len(self.rows)), "error", f"{type(exc).__name__}: {exc}")
            return
        self.stats.decode_steps += 1
        self._deliver(rows, sampled, version)

    def _deliver(self, rows: list[_Row], sampled: list[Sampled], version: int) -> None:
        """Hand each row its sampled token; retire the rows that finished."""
        for row, (token_id, logprob, top) in zip(rows, sampled, strict=True):
            row.last_id = token_id
            row.produced += 1
            self.stats.generated_tokens += 1
            row.handle._push(Token(row.choice, token_id, logprob, top, version))
            if token_id in row.params.stop_ids:
                row.finish_reason = "stop"
            elif row.produced >= row.params.max_tokens:
                row.finish_reason = "length"
        done = [i for i, row in enumerate(self.rows) if row.finish_reason is not None]
        if done:
            self._retire(done)

    def _retire(self, indices: range | list[int], reason: Literal["abort", "error"] | None = None,
                error: str = "") -> None:
        """Free rows (the last live row fills each hole, keeping live rows contiguous) and end their choices
        with `reason`, or with the row's own finish reason."""
        for i in sorted(indices, reverse=True):
            row = self.rows[i]
            self.reserved_tokens -= row.handle.row_tokens
            why = reason or row.finish_reason or "abort"
            if row.handle._finish(row.choice, why, error):
                self.stats.requests_finished += 1
                self.stats.requests_aborted += why == "abort"
            last = len(self.rows) - 1
            self.cache.move(last, i)
            self.rows[i] = self.rows[last]
            self.rows.pop()
            self.cache.lengths[last] = 0

    # ---- model calls (worker thread) ---------------------------------------------------------------
    def _prefill_step(self, handles: list[RequestHandle], new_rows: list[list[_Row]], first_row: int
                      ) -> tuple[list[list[PromptToken] | None], list[Sampled]]:
        model, device = self.model, self.model.device
        prompts = [h.request.prompt_ids for h in handles]
        width = max(len(p) for p in prompts)
        ids_BT = torch.zeros(len(prompts), width, dtype=torch.long)
        mask_BT = torch.zeros(len(prompts), width, dtype=torch.bool)
        for b, prompt in enumerate(prompts):  # right padding: every row's tokens start at column 0
            ids_BT[b, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            mask_BT[b, :len(prompt)] = True
        ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
        last_B = torch.tensor([len(p) - 1 for p in prompts], device=device)
        with torch.inference_mode():
            prefill_cache = model.new_kv_cache(len(prompts), width)
            hidden_BTD = model.hidden_states(ids_BT, kv_cache=prefill_cache, attention_mask=mask_BT)
            logits_BV = model.logits(hidden_BTD[torch.arange(len(prompts), device=device), last_B], fp32=True)
            prompt_lps: list[list[PromptToken] | None] = []
            for b, handle in enumerate(handles):
                k = handle.request.prompt_logprobs
                prompt_lps.append(None if k is None else self._score_prompt(hidden_BTD[b], ids_BT[b], len(prompts[b]), k))
            row, source, flat_rows = first_row, [], []
            for b, rows in enumerate(new_rows):
                for r in rows:
                    self.cache.load_prefill(row, prefill_cache, b, len(prompts[b]))
                    row += 1
                    source.append(b)
                    flat_rows.append(r)
            if not flat_rows:
                return prompt_lps, []
            return prompt_lps, self._sample(logits_BV[torch.tensor(source, device=device)], flat_rows)

    def _score_prompt(self, hidden_TD: torch.Tensor, ids_T: torch.Tensor, length: int, k: int) -> list[PromptToken]:
        if length < 2:
            return []
        lp_TV = torch.log_softmax(self.model.logits(hidden_TD[:length - 1], fp32=True), dim=-1)
        own_T = lp_TV.gather(1, ids_T[1:length, None])  # [T, 1]
        ranks = ((lp_TV > own_T).sum(-1) + 1).tolist()
        tops: list[tuple[tuple[int, float], ...]] = [()] * (length - 1)
        if k > 0:
            values, indices = torch.topk(lp_TV, min(k, lp_TV.shape[-1]), dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        return [PromptToken(lp, rank, top) for lp, rank, top in zip(own_T[:, 0].tolist(), ranks, tops)]

    def _decode_step(self, rows: list[_Row]) -> list[Sampled]:
        model = self.model
        with torch.inference_mode():
            if self._graphs is not None:  # CUDA: the step replays a captured graph (model/graph_decode.py)
                n = len(rows)
                lengths = self.cache.lengths[:n]
                ids_N = torch.tensor([r.last_id for r in rows], dtype=torch.long).to(model.device, non_blocking=True)
                lengths_N = torch.tensor(lengths, dtype=torch.long).to(model.device, non_blocking=True)
                logits_NV = self._graphs.logits(ids_N, lengths_N, longest=max(lengths))
                for b in range(n):
                    self.cache.lengths[b] += 1
                return self._sample(logits_NV, rows)
            ids_N1 = torch.tensor([[r.last_id] for r in rows], dtype=torch.long, device=model.device)
            step = self.cache.decode_step(len(rows))
            hidden_N1D = model.hidden_states(ids_N1, kv_cache=step, check_ids=False)  # type: ignore[arg-type]
            return self._sample(model.logits(hidden_N1D[:, -1], fp32=True), rows)

    def _sample(self, logits_NV: torch.Tensor, rows: list[_Row]
                ) -> list[Sampled]:
        """One token per row under its own sampling parameters, with its raw log-prob and top alternatives.
        Greedy rows take the argmax; unseeded rows with equal parameters sample together; a seeded row
        samples alone with its own generator (as `generate` does for a batch of one)."""
        raw_NV = torch.log_softmax(logits_NV, dim=-1)
        ids_N = torch.argmax(logits_NV, dim=-1)
        groups: dict[object, list[int]] = {}
        for i, row in enumerate(rows):
            p = row.params
            if not p.greedy:
                key = ("seeded", i) if row.generator is not None else (p.temperature, p.top_k, p.top_p)
                groups.setdefault(key, []).append(i)
        for members in groups.values():
            p, generator = rows[members[0]].params, rows[members[0]].generator or self._generator
            index = torch.tensor(members, device=logits_NV.device)
            filtered = sampling_logits(logits_NV[index], p.temperature, p.top_k, p.top_p)
            ids_N[index] = sample_from_logits(filtered, generator)
        logprobs = raw_NV.gather(1, ids_N[:, None])[:, 0].tolist()
        k = max(r.handle.request.top_logprobs for r in rows)
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(rows)
        if k > 0:
            top_values, top_ids = torch.topk(raw_NV, min(k, raw_NV.shape[-1]), dim=-1)
            values, indices = top_values.tolist(), top_ids.tolist()
            tops = [tuple(zip(indices[i], values[i]))[:r.handle.request.top_logprobs] for i, r in enumerate(rows)]
        return [(int(t), lp, top) for t, lp, top in zip(ids_N.tolist(), logprobs, tops)]
