"""SFT warm start: expert demonstrations through the real agent loop, then cross-entropy on policy tokens."""

from __future__ import annotations

import asyncio

import gymnasium
import pytest
import torch

import m2rl.envs  # noqa: F401  (registers the env ids)
from m2rl.agent.loop import LoopConfig
from m2rl.envs.experts import python_expert
from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer
from m2rl.rl.batch import collate
from m2rl.rl.sft import SFTConfig, collect_demonstrations, sft_loss, train_sft


def make_env() -> gymnasium.Env:
    return gymnasium.make("m2rl/Python-v0", backend="bwrap", split="train", max_steps=3, kinds=("arith",))


@pytest.mark.bwrap
def test_demonstrations_are_token_exact_and_train_only_policy_tokens() -> None:
    tokenizer = M2Tokenizer.tiny()
    probe = make_env()
    task_ids = [t.id for t in probe.unwrapped.task_set.tasks("train", 3, kinds=("arith",))]
    probe.close()
    demos = asyncio.run(collect_demonstrations(make_env, python_expert, task_ids, tokenizer,
                                               LoopConfig(max_turns=3, max_context_tokens=1024)))
    assert len(demos) == 3  # every expert episode was resolved
    for demo in demos:
        assert demo.metadata["continuity_violations"] == 0
        sampled = [demo.ids[s.start:s.end] for s in demo.spans if s.kind == "sampled"]
        assert len(sampled) == 2  # the python call, then submit
        assert all(seg[-1] == tokenizer.eos_id for seg in sampled)
        # the loss mask is exactly the expert's turns
        masked = [i for i, m in zip(demo.ids, demo.loss_mask) if m]
        assert masked == [i for seg in sampled for i in seg]
        assert "<invoke name=\"submit\">" in tokenizer.decode(sampled[1])

    torch.manual_seed(0)
    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=0)
    batch = collate([d.ids for d in demos], [d.loss_mask for d in demos], [d.logprobs for d in demos],
                    [0.0] * len(demos), pad_id=tokenizer.eos_id)
    before = float(sft_loss(model, batch))
    losses = train_sft(model, demos, SFTConfig(steps=25, batch_size=3, lr=3e-3, warmup_steps=1),
                       pad_id=tokenizer.eos_id)
    after = float(sft_loss(model, batch))
    assert before > 7.0  # ~log(4096) for random weights
    assert after < before / 3 and losses[-1] < losses[0]
