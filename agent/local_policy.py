"""LocalPolicy: the in-process m2rl model behind the Policy protocol, with request batching.

Many episodes run concurrently (`arun_episode`), each awaiting one `generate` at a time. A single
worker task collects the requests that arrive within `batch_window_s` of the first into one batched
`m2rl.model.generation` call (run in a thread so the event loop keeps serving envs), then hands each
request its own output. `update_weights` swaps weights between batches and bumps `policy_version`,
which every output carries so the learner knows how stale a segment is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any, Literal

import torch
from m2rl.agent.policy import PolicyOutput, SamplingParams, validate_prompt_ids
from m2rl.model.generation import generate
from m2rl.model.tokenizer import M2Tokenizer

_Request = tuple[list[int], SamplingParams, "asyncio.Future[PolicyOutput]"]


class LocalPolicy:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: M2Tokenizer,
        *,
        max_batch_size: int = 32,
        batch_window_s: float = 0.005,
        logprobs_mode: Literal["raw", "processed"] = "raw",
        policy_version: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        # "raw": log-probs under the policy itself (temperature 1), what the learner recomputes and
        # vLLM's default; "processed": under the temperature/top-k/top-p sampling distribution.
        self.logprobs_mode = logprobs_mode
        self.policy_version = policy_version
        # Like vLLM's max_model_len: prompt + max_tokens must fit (default: the model's trained context).
        self.max_model_len = max_model_len or int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.batch_sizes: list[int] = []  # size of every generate() call made, for tests and metrics
        self._weights_lock = threading.Lock()  # generation and weight swaps never overlap
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task[None] | None = None

    # -- weights ------------------------------------------------------------------------------------

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        """Load new weights (strict) and bump the policy version; waits for a running batch to finish."""
        with self._weights_lock:
            self.model.load_state_dict(state_dict, strict=True)
            self.policy_version = self.policy_version + 1 if version is None else int(version)
            return self.policy_version

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        return self.update_weights(state_dict, version)

    # -- generation ---------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        prompt_ids = validate_prompt_ids(prompt_ids, self.tokenizer.vocab_size)
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} exceeds "
                             f"max_model_len {self.max_model_len}")
        queue = self._ensure_worker()
        fut: asyncio.Future[PolicyOutput] = asyncio.get_running_loop().create_future()
        await queue.put((prompt_ids, params, fut))
        return await fut

    async def aclose(self) -> None:
        if self._worker is not None and self._loop is asyncio.get_running_loop():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._worker, self._queue, self._loop = None, None, None

    def _ensure_worker(self) -> asyncio.Queue[_Request]:
        loop = asyncio.get_running_loop()
        # One queue and worker per event loop (tests and scripts may call asyncio.run many times).
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve(self._queue), name="LocalPolicy-batcher")
        assert self._queue is not None
        return self._queue

    async def _serve(self, queue: asyncio.Queue[_Request]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.batch_window_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            for params, group in self._group(batch):
                live = [(p, f) for p, f in group if not f.done()]  # skip callers that were cancelled
                if not live:
                    continue
                try:
                    outputs = await asyncio.to_thread(self._generate_batch, [p for p, _ in live], params)
                except Exception as e:  # noqa: BLE001 - the callers get the error; the worker keeps serving
                    for _, f in live:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), out in zip(live, outputs):
                    if not f.done():
                        f.set_result(out)

    @staticmethod
    def _group(batch: list[_Request]) -> list[tuple[SamplingParams, list[tuple[list[int], Any]]]]:
        """One generate() call takes one SamplingParams, so split the batch by equal params.
        A seeded request runs alone: its output must not depend on what it happened to be batched with."""
        groups: list[tuple[SamplingParams, list[tuple[list[int], Any]]]] = []
        for prompt, params, fut in batch:
            for gparams, items in groups:
                if params.seed is None and gparams == params:
                    items.append((prompt, fut))
                    break
            else:
                groups.append((params, [(prompt, fut)]))
        return groups

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[PolicyOutput]:
        eos = self.tokenizer.eos_id
        stop_ids = tuple(params.stop_ids) if eos in params.stop_ids else (*params.stop_ids, eos)
        params = dataclasses.replace(params, stop_ids=stop_ids)
        with self._weights_lock, torch.inference_mode():
            version = self.policy_version
            self.batch_sizes.append(len(prompts))
            outs = generate(self.model, prompts, params)
        return [
            PolicyOutput(
                ids=[int(t) for t in o.ids],
                logprobs=[float(x) for x in (o.raw_logprobs if self.logprobs_mode == "raw" else o.logprobs)],
                finish_reason=o.finish_reason,
                policy_version=version,
            )
            for o in outs
        ]
