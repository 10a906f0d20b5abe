"""The learner over every data-parallel rank, driven by rank 0's training loop.

Rank 0 runs the Trainer (rollouts, evaluation, logging, checkpoints, weight sync); the other ranks hold only
their shard of the learner and wait for rank 0's commands, which travel over the gloo control group:

    rank 0: Trainer                                   ranks 1..: follow()
    group.update(batch) --("update", batch)------->   learner_step(batch)
      learner_step(batch)                               same forwards, backwards and collectives, same order
      whole weights -> rank 0's full copy
    group.stop()        --("stop", None)---------->   return

`learner_step` is the one sequence of collectives every rank runs per update: the generator-vs-learner gap
(a no-grad pass), `Learner.update`, and the gathering of the whole weights to rank 0. After it, rank 0's full
copy (`LearnerGroup.full_model`) holds the learner's weights: the generator is synced, probed and
checkpointed from it, with no collective. In one process there is no copy: `full_model` is the learner's
own model and every step is local.
"""

from __future__ import annotations

import copy
import signal
from typing import TYPE_CHECKING

import torch
from m2rl.rl.batch import RolloutBatch
from m2rl.rl.distributed import SingleProcess, init_distributed
from m2rl.rl.learner import Learner, LearnerConfig
from m2rl.rl.parity import batch_logprob_gap
from torch import nn

if TYPE_CHECKING:
    from m2rl.rl.trainer import TrainConfig

UPDATE, STOP = "update", "stop"


class LearnerGroup:
    """Rank 0's handle on the learner of every rank (or the only learner, in one process)."""

    def __init__(self, model: nn.Module, config: LearnerConfig, parallel: SingleProcess) -> None:
        self.parallel = parallel
        # Rank 0 keeps the whole model: the learner's own copy becomes a shard of it.
        self.full_model = copy.deepcopy(model) if parallel.world > 1 else model
        self.learner = Learner(model, config, parallel=parallel)
        self.stopped = False

    @property
    def sharded(self) -> bool:
        return self.parallel.world > 1

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One update on every rank; returns the learner's metrics (`learner/...`) and the log-prob gap."""
        self.parallel.broadcast((UPDATE, batch))
        return learner_step(self.learner, batch, self.full_model)

    def stop(self) -> None:
        """Release the other ranks (each returns from `follow`); called once, when the run ends."""
        if not self.stopped:
            self.stopped = True
            self.parallel.broadcast((STOP, None))


def learner_step(learner: Learner, batch: RolloutBatch, full_model: nn.Module | None) -> dict[str, float]:
    """The gap, the update, then the whole weights into `full_model` (rank 0) when the learner is sharded."""
    gap = batch_logprob_gap(learner, batch)  # before the update changes the learner
    metrics = {f"learner/{k}": v for k, v in learner.update(batch).items()}
    if learner.parallel.world > 1:
        state = learner.parallel.full_state_dict(learner.model)  # a collective: every rank calls it
        if full_model is not None:
            full_model.load_state_dict(state)
    return metrics | gap


def follow(learner: Learner) -> int:
    """Ranks other than 0: run rank 0's commands until it stops them; returns the number of updates."""
    updates = 0
    while True:
        command, batch = learner.parallel.broadcast()
        if command == STOP:
            return updates
        if command != UPDATE:
            raise RuntimeError(f"unknown command {command!r} from rank 0")
        learner_step(learner, batch, None)
        updates += 1


def run_follower(config: TrainConfig) -> int:
    """A rank other than 0 of `m2rl train` under torchrun: the same model and learner as rank 0 (the same
    weights: a checkpoint, or a seeded init), then `follow`. Returns the number of updates it took part in."""
    from m2rl.rl.trainer import build_model_and_tokenizer, seed_everything

    # Rank 0 owns the shutdown (it saves the last completed step, then stops us); Ctrl-C reaches every rank.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, config.threads))
    seed_everything(config.seed)
    parallel = init_distributed(config.distributed, config.device)
    try:
        model, _ = build_model_and_tokenizer(config.model, str(parallel.device))
        return follow(Learner(model, config.learner, parallel=parallel))
    finally:
        parallel.close()
