"""What `m2rl train` leaves behind loads where users load models.

A tiny run (tiny preset, two steps, a checkpoint each step) starts from a random model with non-trivial
norms and routing bias, so a misnamed or dropped `e_score_correction_bias`, a norm saved as ones, or a
rotation of all head dims instead of the partial `rotary_dim` changes the logits. The oracle is the run's
own in-memory model: transformers' MiniMaxM2ForCausalLM, loaded from the run's export with nothing but
`from_pretrained(dir)`, must give its logits (both in fp32, where the router is fp32 too, so top-k
choices agree). Then the export's tokenizer renders the M2 chat format, and `model.init` starts new runs
from the run, from a checkpoint, and refuses other directories in one line.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from m2rl.agent.format import render
from m2rl.config import load_config
from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer, load_pretrained, save_pretrained
from m2rl.model.checkpoint import read_state_dict
from m2rl.rl.checkpoint import latest_checkpoint
from m2rl.rl.preflight import config_problems, resolve_init
from m2rl.rl.trainer import TrainConfig, Trainer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "steps=2", "checkpoint_every=1", "keep_checkpoints=3", "eval.every=0", "eval.num_tasks=2",
    "rollout.num_envs=4", "rollout.group_size=2", "rollout.max_new_tokens=12",
    "rollout.batch_warmup.start_size=4", "rollout.batch_warmup.target_size=4",
    "rollout.batch_warmup.multiple_of=2", "rollout.batch_warmup.warmup_steps=0",
    "rollout.dynamic_sampling=false", "env.max_steps=2", "env.num_train_tasks=8", "threads=1",
]
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
LEARNER_FILES = {"optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.pt", "meta.json"}


@dataclass
class TrainedRun:
    directory: Path
    model: M2ForCausalLM  # the learner's model as the run ended: the oracle for the export


def random_init(directory: Path) -> Path:
    """A random tiny model whose norms and routing bias are not their defaults (ones, zeros)."""
    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(std=0.05, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
        for buffer in model.buffers():  # e_score_correction_bias: it chooses experts, so it moves the logits
            buffer.copy_(0.5 * torch.randn(buffer.shape, generator=generator))
    save_pretrained(model, directory, tokenizer=M2Tokenizer.tiny())
    return directory


def small_config(root: Path, name: str, *extra: str) -> TrainConfig:
    overrides = [*SMALL, f"run_root={root}", f"name={name}", *extra]
    return load_config(TrainConfig, REPO / "configs" / "train.yaml", overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    root = tmp_path_factory.mktemp("runs")
    init = random_init(tmp_path_factory.mktemp("init") / "tiny-random")
    trainer = Trainer(small_config(root, "t", f"model.init={init}"))
    trainer.train()
    return TrainedRun(root / "t", trainer.model.eval())


def ids_for(config: M2Config) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.bwrap
def test_the_run_exports_its_model_in_final_and_in_every_checkpoint(trained: TrainedRun) -> None:
    final = trained.directory / "final"
    assert {p.name for p in final.iterdir()} == MODEL_FILES  # the model only: no learner state
    checkpoints = sorted((trained.directory / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_000000001", "step_000000002"]
    for checkpoint in checkpoints:
        assert {p.name for p in checkpoint.iterdir()} == MODEL_FILES | LEARNER_FILES  # no model.pt
    # the weights are on disk once: final/ shares the last checkpoint's files
    last = checkpoints[-1]
    assert (final / "model.safetensors").stat().st_ino == (last / "model.safetensors").stat().st_ino
    saved = read_state_dict(final)
    assert all(torch.equal(saved[k], v) for k, v in trained.model.state_dict().items())
    assert json.loads((final / "config.json").read_text())["architectures"] == ["MiniMaxM2ForCausalLM"]


@pytest.mark.bwrap
@pytest.mark.parametrize("export", ["final", "checkpoints/step_000000001"])
def test_transformers_loads_the_export_with_the_models_logits(trained: TrainedRun, export: str) -> None:
    directory = trained.directory / export
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MiniMaxM2ForCausalLM"
    assert hf.model.layers[0].mlp.e_score_correction_bias.abs().sum() > 0  # the bias arrived under its name
    # the final export against the run's own model; an earlier checkpoint against the weights it recorded
    ours = trained.model if export == "final" else load_pretrained(directory)
    ids = ids_for(ours.config)
    with torch.no_grad():
        expected = ours(ids)
        got = hf(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert load_pretrained(directory).state_dict().keys() == ours.state_dict().keys()


@pytest.mark.bwrap
def test_the_exported_tokenizer_renders_the_m2_chat_format(trained: TrainedRun) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained.directory / "final")
    parameters = {"type": "object", "properties": {"code": {"type": "string"}}}
    tools = [{"type": "function",
              "function": {"name": "python", "description": "Run Python code.", "parameters": parameters}}]
    call = {"type": "function", "function": {"name": "python", "arguments": {"code": "print(12*34)"}}}
    messages = [
        {"role": "system", "content": "Use the tool."},
        {"role": "user", "content": "What is 12 * 34?"},
        {"role": "assistant", "reasoning_content": "Compute it.", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "408\n"},
    ]
    expected = render(messages, tools, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text == expected
    ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    assert list(ids) == M2Tokenizer.from_file(trained.directory / "final").encode(expected)


@pytest.mark.bwrap
@pytest.mark.parametrize("init", ["run", "checkpoint"])
def test_model_init_starts_a_new_run_from_a_run_or_a_checkpoint(
    trained: TrainedRun, tmp_path: Path, init: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from m2rl.cli import main

    source = trained.directory if init == "run" else trained.directory / "checkpoints" / "step_000000001"
    expected = trained.directory / "final" if init == "run" else source
    assert resolve_init(str(source)) == expected
    # A run of zero steps exports exactly the model it started from.
    argv = ["train", *SMALL, f"run_root={tmp_path}", "name=next", f"model.init={source}", "steps=0"]
    assert main(argv) == 0, capsys.readouterr().err
    started = read_state_dict(tmp_path / "next" / "final")
    origin = read_state_dict(expected)
    assert started.keys() == origin.keys() and all(torch.equal(started[k], origin[k]) for k in origin)


@pytest.mark.bwrap
def test_model_init_of_an_interrupted_run_is_its_newest_checkpoint(trained: TrainedRun,
                                                                   tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted"  # a run that never reached its end: no final/
    shutil.copytree(trained.directory / "checkpoints", interrupted / "checkpoints")
    assert resolve_init(str(interrupted)) == latest_checkpoint(interrupted / "checkpoints")


def test_model_init_refuses_a_directory_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    config = load_config(TrainConfig, REPO / "configs" / "train.yaml",
                         [f"run_root={tmp_path / 'runs'}", f"model.init={tmp_path / 'notes'}"])
    problems = [p for p in config_problems(config) if p.startswith("model.init")]
    assert problems == [f"model.init: {tmp_path / 'notes'} is not a Hugging Face model directory (no "
                        "config.json), a checkpoint (<run>/checkpoints/step_N) or a run directory (with "
                        "final/ or checkpoints/)"]


def test_model_init_relative_paths_look_in_the_working_directory_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    random_init(tmp_path / "runs" / "mine" / "final")
    monkeypatch.chdir(tmp_path)
    assert resolve_init("runs/mine") == tmp_path / "runs" / "mine" / "final"
    # the shipped assets still resolve against the repository from anywhere
    assert resolve_init("model/assets/tiny-python-sft") == REPO / "model" / "assets" / "tiny-python-sft"
