"""Checkpoint/resume: a resumed CPU run is bitwise equal to an uninterrupted one; saves are atomic, pruned."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from m2rl.rl.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from m2rl.rl.learner import Learner, LearnerConfig
from m2rl.rl.lr_schedule import LRScheduleConfig
from rl_test_doubles import TinyCausalLM, random_batch

TOTAL_STEPS = 6
STOP_AT = 3


def make_learner() -> Learner:
    config = LearnerConfig(
        lr=5e-2,
        mini_batches=2,
        epochs=2,
        micro_batch_tokens=20,
        weight_decay=0.01,
        lr_schedule=LRScheduleConfig(kind="warmup_cosine", warmup_steps=2, total_steps=20),
    )
    return Learner(TinyCausalLM(), config)


def next_batch(data_position: int):
    """Draws from the torch, numpy and python global RNGs, so all three must be restored on resume."""
    batch = random_batch(None, rows=5)  # torch global RNG
    batch.advantages = batch.advantages * float(np.random.uniform(0.5, 1.5)) * random.choice([1.0, -1.0])
    return batch, data_position + 1


def train(learner: Learner, start: int, stop: int, data_position: int) -> int:
    for _ in range(start, stop):
        batch, data_position = next_batch(data_position)
        learner.update(batch)
    return data_position


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_is_bitwise_identical(tmp_path):
    seed_all(0)
    reference = make_learner()
    train(reference, 0, TOTAL_STEPS, 0)
    reference_rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    seed_all(0)
    first = make_learner()
    position = train(first, 0, STOP_AT, 0)
    save_checkpoint(
        tmp_path,
        STOP_AT,
        first.model,
        first.optimizer,
        first.scheduler,
        trainer_state={"learner": first.state_dict()},
        data_position=position,
    )
    del first

    seed_all(12345)  # a fresh process: different weights and RNG until the checkpoint is loaded
    resumed = make_learner()
    state = load_checkpoint(tmp_path, resumed.model, resumed.optimizer, resumed.scheduler)
    resumed.load_state_dict(state.trainer_state["learner"])
    assert state.step == STOP_AT and state.data_position == STOP_AT
    train(resumed, state.step, TOTAL_STEPS, state.data_position)

    for (name, a), b in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    ref_opt, res_opt = reference.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in ref_opt["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_opt["state"][k][key], res_opt["state"][k][key])
    assert reference.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert reference.optimizer_steps == resumed.optimizer_steps
    assert torch.equal(torch.get_rng_state(), reference_rng[0])
    assert (
        np.array_equal(np.random.get_state()[1], reference_rng[1]) and random.getstate() == reference_rng[2]
    )


def test_resume_without_rng_restore_diverges(tmp_path):
    """The bitwise test above can fail: skipping the RNG restore changes the data and the result."""
    seed_all(0)
    reference = make_learner()
    train(reference, 0, 4, 0)
    seed_all(0)
    first = make_learner()
    train(first, 0, 2, 0)
    save_checkpoint(
        tmp_path,
        2,
        first.model,
        first.optimizer,
        first.scheduler,
        trainer_state={"learner": first.state_dict()},
    )
    seed_all(99)
    resumed = make_learner()
    state = load_checkpoint(tmp_path, resumed.model, resumed.optimizer, resumed.scheduler, restore_rng=False)
    resumed.load_state_dict(state.trainer_state["learner"])
    train(resumed, 2, 4, 2)
    assert not all(
        torch.equal(a, b) for a, b in zip(reference.model.parameters(), resumed.model.parameters())
    )


def test_keep_last_and_latest(tmp_path):
    model = TinyCausalLM()
    for step in (1, 5, 10, 20):
        save_checkpoint(tmp_path, step, model, keep_last=2, trainer_state={"note": step})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20]
    assert latest_checkpoint(tmp_path).name == "step_000000020"
    state = load_checkpoint(tmp_path / "step_000000010", TinyCausalLM())
    assert state.step == 10 and state.trainer_state == {"note": 10}
    meta = json.loads((tmp_path / "step_000000020" / "meta.json").read_text())
    assert meta["step"] == 20


def test_failed_save_leaves_no_partial_checkpoint(tmp_path):
    model = TinyCausalLM()
    save_checkpoint(tmp_path, 1, model)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda cannot be pickled
        save_checkpoint(tmp_path, 2, model, trainer_state={"unpicklable": lambda: None})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000001"]
    # a crash mid-save leaves a temp dir behind: it is never taken for a checkpoint, and is cleaned later
    (tmp_path / ".tmp_step_000000003_1_1").mkdir()
    (tmp_path / ".tmp_step_000000003_1_1" / "meta.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_000000001"
    save_checkpoint(tmp_path, 4, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000001", "step_000000004"]


def test_resaving_a_step_replaces_it(tmp_path):
    model = TinyCausalLM()
    save_checkpoint(tmp_path, 3, model, data_position={"epoch": 0})
    save_checkpoint(tmp_path, 3, model, data_position={"epoch": 1})
    assert load_checkpoint(tmp_path, TinyCausalLM()).data_position == {"epoch": 1}
    assert len(list(tmp_path.iterdir())) == 1


def test_bad_inputs(tmp_path):
    from m2rl.model import CheckpointError

    model = TinyCausalLM()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing", model)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, model, data_position=object())
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model, keep_last=0)
    save_checkpoint(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        load_checkpoint(tmp_path, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_damaged_checkpoints_are_detected_on_load(tmp_path):
    from m2rl.model import CheckpointError

    model = TinyCausalLM()
    path = save_checkpoint(tmp_path, 1, model, trainer_state={"note": 1})
    weights = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"step_000000001: model.pt is damaged \(sha256 mismatch\)"):
        load_checkpoint(path, TinyCausalLM())
    flipped = bytearray(weights)
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one bit pattern changed: only a checksum sees it
    (path / "model.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="model.pt is damaged"):
        load_checkpoint(path, TinyCausalLM())
    (path / "meta.json").write_bytes(b"\x00garbage{")
    with pytest.raises(CheckpointError, match=r"step_000000001: meta.json is not valid JSON"):
        load_checkpoint(path, TinyCausalLM())


def test_a_failed_load_leaves_the_model_untouched(tmp_path):
    from m2rl.model import CheckpointError

    save_checkpoint(tmp_path, 1, TinyCausalLM(), trainer_state={"note": 1})
    (tmp_path / "step_000000001" / "trainer_state.pt").write_bytes(b"junk")
    target = TinyCausalLM()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "step_000000001", target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_latest_readable_checkpoint_falls_back_past_a_damaged_one(tmp_path):
    from m2rl.model import CheckpointError
    from m2rl.rl.checkpoint import load_latest_checkpoint

    model = TinyCausalLM()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, trainer_state={"note": step})
    newest = tmp_path / "step_000000002" / "model.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    state, skipped = load_latest_checkpoint(tmp_path, TinyCausalLM())
    assert state.step == 1 and state.trainer_state == {"note": 1}
    assert [(p.name, reason) for p, reason in skipped] == [("step_000000002", "model.pt is damaged (sha256 mismatch)")]
    # the damaged one is set aside so later saves and resumes never take it for the newest
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / "damaged-step_000000002").is_dir()
    (tmp_path / "step_000000001" / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*: step_000000001: meta.json is not valid"):
        load_latest_checkpoint(tmp_path, TinyCausalLM())


# ---------------------------------------------------------------------------------------------- M2 models

def make_m2_learner(seed: int) -> Learner:
    from m2rl.model import M2Config, M2ForCausalLM

    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(std=0.05, seed=seed)
    with torch.no_grad():  # a non-zero routing bias, so a lost or misnamed bias shows up
        for name, buffer in model.named_buffers():
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed)))
    config = LearnerConfig(lr=1e-2, micro_batch_tokens=64, weight_decay=0.01,
                           lr_schedule=LRScheduleConfig(kind="warmup_cosine", warmup_steps=1, total_steps=10))
    return Learner(model, config)


def train_m2(learner: Learner, steps: int) -> None:
    for _ in range(steps):  # the batch comes from the global torch RNG, which the checkpoint restores
        learner.update(random_batch(None, rows=3, max_len=10, vocab_size=learner.model.config.vocab_size))


def test_an_m2_checkpoint_is_a_hugging_face_directory_and_resumes_bitwise(tmp_path):
    from m2rl.model import M2Tokenizer, load_pretrained

    seed_all(0)
    reference = make_m2_learner(seed=0)
    train_m2(reference, 4)

    seed_all(0)
    first = make_m2_learner(seed=0)
    train_m2(first, 2)
    path = save_checkpoint(tmp_path, 2, first.model, first.optimizer, first.scheduler,
                           trainer_state={"learner": first.state_dict()}, tokenizer=M2Tokenizer.tiny())
    # The weights live once, in the Hugging Face files; the learner state sits beside them.
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "optimizer.pt", "rng.pt", "trainer_state.pt", "meta.json"} <= files
    assert "model.pt" not in files
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 2 and set(meta["sha256"]) == files - {"meta.json"}
    exported = load_pretrained(path)  # what model.init reads
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 exported.state_dict().values()))

    seed_all(7)  # a fresh process: other weights and RNG until the checkpoint is loaded
    resumed = make_m2_learner(seed=7)
    state = load_checkpoint(tmp_path, resumed.model, resumed.optimizer, resumed.scheduler)
    resumed.load_state_dict(state.trainer_state["learner"])
    train_m2(resumed, 2)
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json", "tokenizer.json"])
def test_every_file_of_the_exported_model_is_checked(tmp_path, damaged):
    from m2rl.model import CheckpointError, M2Tokenizer
    from m2rl.rl.checkpoint import model_directory

    learner = make_m2_learner(seed=0)
    path = save_checkpoint(tmp_path, 1, learner.model, learner.optimizer, tokenizer=M2Tokenizer.tiny())
    data = bytearray((path / damaged).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: only the recorded sha256 sees it
    (path / damaged).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"step_000000001: {damaged} is damaged \(sha256 mismatch\)"):
        load_checkpoint(path, make_m2_learner(seed=1).model)
    with pytest.raises(CheckpointError, match=rf"step_000000001: {damaged} is damaged \(sha256 mismatch\)"):
        model_directory(path)  # model.init=<this checkpoint> is refused too


def test_publish_export_links_the_model_files_without_the_learner_state(tmp_path):
    from m2rl.model import M2Tokenizer, load_pretrained
    from m2rl.rl.checkpoint import publish_export

    learner = make_m2_learner(seed=0)
    path = save_checkpoint(tmp_path / "checkpoints", 3, learner.model, learner.optimizer, learner.scheduler,
                           tokenizer=M2Tokenizer.tiny(), keep_last=1)
    final = publish_export(path, tmp_path / "final")
    assert sorted(p.name for p in final.iterdir()) == sorted(
        p.name for p in path.iterdir() if p.suffix != ".pt" and p.name != "meta.json")
    # the weights are on disk once
    assert (final / "model.safetensors").stat().st_ino == (path / "model.safetensors").stat().st_ino
    # and outlive the checkpoint's pruning
    save_checkpoint(tmp_path / "checkpoints", 4, learner.model, tokenizer=M2Tokenizer.tiny(), keep_last=1)
    assert not path.exists()
    assert all(torch.equal(a, b) for a, b in zip(learner.model.state_dict().values(),
                                                 load_pretrained(final).state_dict().values()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directories left


def test_model_directory_finds_the_model_of_a_run_a_checkpoint_or_a_model(tmp_path):
    from m2rl.model import CheckpointError, M2Tokenizer
    from m2rl.rl.checkpoint import model_directory, publish_export

    learner = make_m2_learner(seed=0)
    run = tmp_path / "run"
    for step in (1, 2):
        newest = save_checkpoint(run / "checkpoints", step, learner.model, tokenizer=M2Tokenizer.tiny())
    assert model_directory(newest) == newest
    assert model_directory(run) == newest  # an interrupted run: its newest checkpoint
    assert model_directory(run / "checkpoints") == newest
    publish_export(newest, run / "final")
    assert model_directory(run) == run / "final"
    assert model_directory(run / "final") == run / "final"

    old = save_checkpoint(tmp_path / "old", 1, TinyCausalLM())  # format 1 kept the weights in model.pt only
    with pytest.raises(CheckpointError, match=r"step_000000001 holds no Hugging Face model \(config.json"):
        model_directory(old)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        model_directory(tmp_path / "empty")
    assert str(info.value) == (f"{tmp_path / 'empty'} is not a Hugging Face model directory (no config.json), a "
                               "checkpoint (<run>/checkpoints/step_N) or a run directory (with final/ or "
                               "checkpoints/)")
