"""The learner on the real (tiny) MiniMax-M2 policy: the chunked model log-prob path, micro-batching, options."""

from __future__ import annotations

import copy

import pytest
import torch
from m2rl.model import M2Config, M2ForCausalLM, token_logprobs
from m2rl.rl.learner import Learner, LearnerConfig, pack_micro_batches
from m2rl.rl.logprobs import generic_token_logprobs, policy_token_logprobs
from rl_test_doubles import random_batch


@pytest.fixture(scope="module")
def tiny_m2() -> M2ForCausalLM:
    return M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=0)


def m2_batch(vocab_size: int, seed: int, rows: int = 5):
    return random_batch(torch.Generator().manual_seed(seed), rows=rows, max_len=14, vocab_size=vocab_size)


def test_m2_path_agrees_with_generic_log_softmax(tiny_m2):
    ids = torch.randint(0, tiny_m2.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    lp, ent = policy_token_logprobs(tiny_m2, ids, return_entropy=True, chunk_size=4)
    ref, ref_ent = token_logprobs(tiny_m2, ids, return_entropy=True, chunk_size=4)
    torch.testing.assert_close(lp, ref)
    torch.testing.assert_close(ent, ref_ent)
    glp, gent = generic_token_logprobs(tiny_m2, ids, return_entropy=True)
    torch.testing.assert_close(lp, glp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, gent, rtol=1e-4, atol=1e-4)


def test_m2_micro_batched_gradients_equal_single_batch(tiny_m2):
    batch = m2_batch(tiny_m2.config.vocab_size, seed=1)
    assert len(pack_micro_batches(batch.lengths(), 16)) >= 3
    out = []
    for budget in (10_000, 16):
        model = copy.deepcopy(tiny_m2)
        Learner(model, LearnerConfig(micro_batch_tokens=budget, compute_entropy=False)).compute_gradients(
            batch
        )
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert out[0].keys() == out[1].keys() and len(out[0]) > 0
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_m2_update_with_checkpointing_learns(tiny_m2):
    model = copy.deepcopy(tiny_m2)
    batch = m2_batch(model.config.vocab_size, seed=2, rows=4)
    batch.advantages = batch.loss_mask.double()  # reinforce every sampled token
    learner = Learner(model, LearnerConfig(lr=1e-2, gradient_checkpointing=True, mini_batches=2, epochs=2))
    assert model.gradient_checkpointing
    mask = batch.loss_mask.float()
    with torch.no_grad():
        before = (token_logprobs(model, batch.input_ids, batch.attention_mask) * mask).sum()
    m = learner.update(batch)
    with torch.no_grad():
        after = (token_logprobs(model, batch.input_ids, batch.attention_mask) * mask).sum()
    assert after > before
    assert m["optimizer_steps"] == 4 and m["grad_norm"] > 0 and m["entropy"] > 0
