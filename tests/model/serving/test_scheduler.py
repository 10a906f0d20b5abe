"""Continuous batching (no HTTP): outputs equal `generate` whatever the batch, rows and budget come back."""

from __future__ import annotations

import asyncio

import pytest
import torch
from m2rl.model import load_pretrained
from m2rl.model.generation import SamplingParams
from m2rl.model.logprobs import token_logprobs
from m2rl.model.serving.request import (
    Finished,
    InvalidRequest,
    Overloaded,
    Prefilled,
    Request,
    RequestHandle,
    Token,
)
from m2rl.model.serving.scheduler import Scheduler, SchedulerConfig
from serving_helpers import TINY_DIR, perturbed_copy, reference, wait_until


async def collect(handle: RequestHandle) -> dict[int, tuple[list[int], list[float], str]]:
    out: dict[int, tuple[list[int], list[float], str]] = {}
    async for event in handle.events():
        if isinstance(event, Token):
            ids, lps, _ = out.setdefault(event.choice, ([], [], ""))
            ids.append(event.token_id)
            lps.append(event.logprob)
        elif isinstance(event, Finished):
            ids, lps, _ = out.setdefault(event.choice, ([], [], ""))
            out[event.choice] = (ids, lps, event.reason)
    return out


def test_greedy_equals_generate_whatever_else_is_in_the_batch(sft_model, tokenizer, prompts) -> None:
    """Greedy requests arrive at different times, next to sampled ones, through a batch too small for all:
    rows join and leave every step, yet each greedy output is `generate`'s for its prompt alone."""
    greedy = SamplingParams(max_tokens=20, greedy=True, stop_ids=(tokenizer.eos_id,))
    noisy = SamplingParams(max_tokens=12, temperature=1.5, stop_ids=(tokenizer.eos_id,))

    async def main() -> list[dict[int, tuple[list[int], list[float], str]]]:
        scheduler = Scheduler(sft_model, SchedulerConfig(max_batch=3, max_model_len=256))
        await scheduler.start()

        async def later(i: int, request: Request) -> dict[int, tuple[list[int], list[float], str]]:
            await asyncio.sleep(0.004 * i)
            return await collect(scheduler.submit(request))

        jobs = [later(i, Request(p, greedy)) for i, p in enumerate(prompts[:6])]
        jobs += [later(i, Request(prompts[-1], noisy)) for i in range(2)]
        outs = await asyncio.gather(*jobs)
        assert scheduler.stats.decode_steps < sum(len(o[0][0]) for o in outs)  # steps were shared
        assert scheduler.batch_size == 0 and scheduler.reserved_tokens == 0
        await scheduler.stop()
        return outs[:6]

    for prompt, out in zip(prompts, asyncio.run(main())):
        ids, logprobs, reason = out[0]
        ref = reference(sft_model, prompt, greedy)
        assert ids == ref.ids and reason == ref.finish_reason
        assert logprobs == pytest.approx(ref.raw_logprobs, abs=1e-4)


def test_seeded_sampling_equals_generate_and_choices_differ(sft_model, tokenizer, prompts) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=11)

    async def main() -> dict[int, tuple[list[int], list[float], str]]:
        scheduler = Scheduler(sft_model, SchedulerConfig(max_batch=4, max_model_len=256))
        await scheduler.start()
        other = scheduler.submit(Request(prompts[0], SamplingParams(max_tokens=16, temperature=1.0)))
        out = await collect(scheduler.submit(Request(prompts[1], params, n=3)))
        await collect(other)
        await scheduler.stop()
        return out

    out = asyncio.run(main())
    for choice in range(3):  # choice i samples with seed + i, as `generate` would alone
        ref = reference(sft_model, prompts[1], SamplingParams(**{**params.__dict__, "seed": 11 + choice}))
        assert out[choice][0] == ref.ids
    assert len({tuple(out[c][0]) for c in range(3)}) > 1


def test_cancel_frees_the_rows_and_the_budget(sft_model, prompts) -> None:
    async def main() -> None:
        scheduler = Scheduler(sft_model, SchedulerConfig(max_batch=2, max_model_len=512))
        await scheduler.start()
        long = scheduler.submit(Request(prompts[0], SamplingParams(max_tokens=400, temperature=1.0), n=2))
        events = long.events()
        while not isinstance(await anext(events), Token):
            pass
        assert scheduler.batch_size == 2 and scheduler.reserved_tokens > 0
        long.cancel()
        rest = [e async for e in events]
        assert sorted(e.choice for e in rest if isinstance(e, Finished) and e.reason == "abort") == [0, 1]
        assert scheduler.batch_size == 0 and scheduler.reserved_tokens == 0
        assert scheduler.stats.generated_tokens < 2 * 400
        after = await collect(scheduler.submit(Request(prompts[1], SamplingParams(max_tokens=3, greedy=True))))
        assert len(after[0][0]) == 3
        await scheduler.stop()

    asyncio.run(main())


def test_token_budget_admits_only_what_fits(sft_model, prompts) -> None:
    """A budget of one request's tokens: the second waits for the first to finish, rows notwithstanding."""
    params = SamplingParams(max_tokens=8, greedy=True)
    budget = len(prompts[0]) + 8

    async def main() -> None:
        scheduler = Scheduler(sft_model, SchedulerConfig(max_batch=4, max_model_len=256, max_tokens_in_flight=budget))
        await scheduler.start()
        first = scheduler.submit(Request(prompts[0], params))
        second = scheduler.submit(Request(prompts[2], params))  # shorter prompt: fits the budget alone
        order: list[str] = []

        async def watch(name: str, handle: RequestHandle) -> None:
            async for event in handle.events():
                if isinstance(event, Prefilled | Finished):
                    order.append(f"{name}:{type(event).__name__}")
                assert scheduler.reserved_tokens <= budget

        await asyncio.gather(watch("first", first), watch("second", second))
        assert order == ["first:Prefilled", "first:Finished", "second:Prefilled", "second:Finished"]
        with pytest.raises(InvalidRequest) as refused:  # could never fit: refused, not queued forever
            scheduler.submit(Request(prompts[0], params, n=2))
        assert refused.value.param == "max_tokens"
        await scheduler.stop()

    asyncio.run(main())


def test_a_full_queue_is_refused(sft_model, prompts) -> None:
    async def main() -> None:
        scheduler = Scheduler(sft_model, SchedulerConfig(max_batch=1, max_model_len=512, max_queue=1))
        await scheduler.start()
        running = scheduler.submit(Request(prompts[0], SamplingParams(max_tokens=300, temperature=1.0)))
        await wait_until(lambda: scheduler.batch_size == 1)
        waiting = scheduler.submit(Request(prompts[1], SamplingParams(max_tokens=2, greedy=True)))
        with pytest.raises(Overloaded):
            scheduler.submit(Request(prompts[2], SamplingParams(max_tokens=2, greedy=True)))
        running.cancel()
        assert len((await collect(waiting))[0][0]) == 2
        await scheduler.stop()

    asyncio.run(main())


@pytest.mark.parametrize("request_fields, param", [
    ({"n": 5}, "n"),  # more choices than rows
    ({"params": SamplingParams(max_tokens=600)}, "max_tokens"),  # past the context
    ({"prompt_ids": [1, 4096]}, "prompt"),  # outside the vocabulary
    ({"prompt_ids": []}, "prompt"),
])
def test_impossible_requests_are_refused_naming_the_field(sft_model, request_fields, param) -> None:
    async def main() -> None:
        scheduler = Scheduler(sft_model, SchedulerConfig(max_batch=4, max_model_len=512))
        await scheduler.start()
        fields = {"prompt_ids": [1, 2, 3], "params": SamplingParams(max_tokens=4), **request_fields}
        with pytest.raises(InvalidRequest) as refused:
            scheduler.submit(Request(**fields))
        assert refused.value.param == param
        await scheduler.stop()

    asyncio.run(main())


def test_prompt_scoring_equals_the_learners_logprobs(sft_model, prompts) -> None:
    async def main() -> list[object]:
        scheduler = Scheduler(sft_model, SchedulerConfig(max_batch=2, max_model_len=512))
        await scheduler.start()
        events = [e async for e in scheduler.submit(Request(prompts[3], SamplingParams(max_tokens=0), n=2,
                                                            prompt_logprobs=3)).events()]
        await scheduler.stop()
        return events

    prefilled, *finished = asyncio.run(main())
    assert isinstance(prefilled, Prefilled) and [e.reason for e in finished] == ["length", "length"]
    learner = token_logprobs(sft_model, torch.tensor([prompts[3]]))[0, 1:].tolist()
    assert [s.logprob for s in prefilled.prompt_logprobs] == pytest.approx(learner, abs=1e-4)
    for score in prefilled.prompt_logprobs:  # the rank agrees with the top alternatives
        assert len(score.top) == 3 and (score.rank == 1) == (score.logprob >= score.top[0][1] - 1e-6)


def test_weight_update_lands_between_steps_and_bumps_the_version(tokenizer, prompts) -> None:
    model = load_pretrained(TINY_DIR)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    greedy = SamplingParams(max_tokens=12, greedy=True)

    async def main() -> None:
        scheduler = Scheduler(model, SchedulerConfig(max_batch=2, max_model_len=256))
        await scheduler.start()
        before = await collect(scheduler.submit(Request(prompts[0], greedy)))
        assert await scheduler.update_weights(perturbed_copy(model)) == 1
        changed = [e async for e in scheduler.submit(Request(prompts[0], greedy)).events()]
        assert {e.policy_version for e in changed if isinstance(e, Token)} == {1}
        assert [e.token_id for e in changed if isinstance(e, Token)] != before[0][0]
        assert await scheduler.update_weights(original, version=7) == 7
        assert (await collect(scheduler.submit(Request(prompts[0], greedy))))[0][0] == before[0][0]
        await scheduler.stop()

    asyncio.run(main())

