"""The learner on CUDA: device placement, bf16 autocast with the fp32 head, micro-batching, checkpoint round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from m2rl.model import M2Config, M2ForCausalLM
from m2rl.rl.checkpoint import load_checkpoint, save_checkpoint
from m2rl.rl.learner import Learner, LearnerConfig
from rl_test_doubles import TinyCausalLM, random_batch

pytestmark = pytest.mark.gpu


def test_m2_update_on_cuda_bf16_and_micro_batching(tmp_path):
    torch.manual_seed(0)
    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=0).cuda()
    batch = random_batch(
        torch.Generator().manual_seed(0), rows=6, max_len=32, vocab_size=model.config.vocab_size
    )
    grads = []
    for budget in (10_000, 40):
        m = copy.deepcopy(model)
        Learner(m, LearnerConfig(micro_batch_tokens=budget, compute_entropy=False)).compute_gradients(
            _to_cuda(batch)
        )
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    learner = Learner(model, LearnerConfig(lr=1e-3, bf16=True, mini_batches=2, gradient_checkpointing=True))
    metrics = learner.update(batch)  # CPU batch: the learner moves it to the model's device
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    path = save_checkpoint(tmp_path, 1, model, learner.optimizer, learner.scheduler)
    fresh = M2ForCausalLM(M2Config.from_preset("tiny")).cuda()
    fresh_learner = Learner(fresh, LearnerConfig(lr=1e-3))
    load_checkpoint(path, fresh, fresh_learner.optimizer, fresh_learner.scheduler, map_location="cuda")
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_generic_model_on_cuda():
    model = TinyCausalLM(dtype=torch.float32).cuda()
    batch = random_batch(torch.Generator().manual_seed(1), rows=4)
    metrics = Learner(model, LearnerConfig(lr=1e-2, bf16=True, epochs=2)).update(batch)
    assert metrics["optimizer_steps"] == 2 and math.isfinite(metrics["loss"])


def _to_cuda(batch):
    return type(batch)(**{k: (v.cuda() if v is not None else None) for k, v in vars(batch).items()})
