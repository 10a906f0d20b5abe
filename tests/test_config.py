from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from m2rl.config import ConfigError, apply_overrides, dump_yaml, load_config, parse_override, to_dict


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class ExampleConfig:
    name: str = "run"
    steps: int = 10
    backend: Literal["docker", "bwrap"] = "bwrap"
    use_kl: bool = False
    tags: list[str] = field(default_factory=list)
    seed: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_compose(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 20\noptim:\n  lr: 0.001\n")
    cfg = load_config(ExampleConfig, path, ["optim.betas=[0.8, 0.9]", "tags=[a, b]", "seed=3", "name=x"])
    assert cfg == ExampleConfig(name="x", steps=20, tags=["a", "b"], seed=3,
                                optim=OptimConfig(lr=0.001, betas=(0.8, 0.9)))


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path: Path) -> None:
    assert load_config(ExampleConfig, None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="'steps'.*expected an integer"):
        load_config(ExampleConfig, None, ["steps=1.5"])


def test_scientific_notation_without_dot_is_a_float(tmp_path: Path) -> None:
    # YAML 1.1 parses `5e-4` as a string; for a float field it is still the number.
    assert load_config(ExampleConfig, None, ["optim.lr=5e-4"]).optim.lr == 5e-4
    assert load_config(ExampleConfig, write(tmp_path, "optim:\n  lr: 1E3\n")).optim.lr == 1000.0
    with pytest.raises(ConfigError, match="'optim.lr'.*expected a number"):
        load_config(ExampleConfig, None, ["optim.lr=fast"])


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, path)
    message = str(info.value)
    assert "optim.learning_rate" in message and str(path) in message and "lr" in message


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'stepz'.*command-line overrides"):
        load_config(ExampleConfig, None, ["stepz=3"])


@pytest.mark.parametrize(
    ("override", "key"),
    [("steps=many", "steps"), ("use_kl=maybe", "use_kl"), ("backend=kvm", "backend"),
     ("optim=3", "optim"), ("tags=notalist", "tags"), ("optim.betas=[1, 2, 3]", "optim.betas")],
)
def test_wrong_types_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(ExampleConfig, None, [override])


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 3\noptim: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"bad YAML in {path} line \d+"):
        load_config(ExampleConfig, path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ExampleConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(ExampleConfig, write(tmp_path, "- 1\n- 2\n"))


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("a..b=1")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = ExampleConfig(tags=["x"], seed=None, optim=OptimConfig(betas=(0.5, 0.6)))
    path = write(tmp_path, dump_yaml(cfg))
    assert load_config(ExampleConfig, path) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.5, 0.6]


def test_post_init_validation_becomes_config_error() -> None:
    @dataclass
    class Checked:
        eps: float = 0.1

        def __post_init__(self) -> None:
            if self.eps < 0:
                raise ValueError("eps must be >= 0")

    with pytest.raises(ConfigError, match="eps must be >= 0"):
        load_config(Checked, None, ["eps=-1"])


def test_duplicate_key_is_an_error_naming_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 1\noptim:\n  lr: 0.1\n  lr: 0.2\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"^duplicate key 'optim.lr' in .*cfg.yaml line 4 \(first set on line 3\)$"):
        load_config(ExampleConfig, path)
    path = write(tmp_path, "tags: [a]\nname: x\ntags: [b]\n")
    with pytest.raises(ConfigError, match=r"^duplicate key 'tags' in .*cfg.yaml line 3 \(first set on line 1\)$"):
        load_config(ExampleConfig, path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"name: \xff\n")
    with pytest.raises(ConfigError, match=r"^config file .*cfg.yaml is not UTF-8 text \(byte 0xff on line 1, offset 6\)$"):
        load_config(ExampleConfig, path)


def test_changed_settings_lists_dotted_keys() -> None:
    from m2rl.config import changed_settings

    old = {"steps": 1, "env": {"id": "a", "kinds": ["x"]}, "name": "r"}
    new = {"steps": 2, "env": {"id": "a", "kinds": ["x", "y"]}, "seed": 3, "name": "r"}
    assert changed_settings(old, new) == [("env.kinds", ["x"], ["x", "y"]), ("seed", None, 3), ("steps", 1, 2)]


# ------------------------------------------------------------------------------- field documentation


@dataclass
class DocumentedConfig:
    """A section with documented fields."""

    lr: float = 1e-3
    """Peak learning rate,
    over two lines."""
    steps: int = 10  # a trailing comment is the fallback
    # comment lines right above a field
    # are the next fallback
    kind: Literal["a", "b"] = "a"
    seed: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""


def test_attribute_docstrings_document_fields() -> None:
    from m2rl.config import field_docs

    assert field_docs(DocumentedConfig) == {
        "lr": "Peak learning rate, over two lines.",
        "steps": "a trailing comment is the fallback",
        "kind": "comment lines right above a field are the next fallback",
        "optim": "The optimizer.",
    }


def test_schema_lists_every_key_with_type_default_and_meaning() -> None:
    from m2rl.config import format_schema, schema_keys

    keys = {k.key: (k.type, k.default, k.doc) for k in schema_keys(DocumentedConfig)}
    assert keys == {
        "lr": ("float", 1e-3, "Peak learning rate, over two lines."),
        "steps": ("int", 10, "a trailing comment is the fallback"),
        "kind": ("a | b", "a", "comment lines right above a field are the next fallback"),
        "seed": ("int | null", None, ""),
        "optim": ("OptimConfig", {"lr": 1e-5, "betas": [0.9, 0.95]}, "The optimizer."),
        "optim.lr": ("float", 1e-5, ""),
        "optim.betas": ("tuple[float, float]", [0.9, 0.95], ""),
    }
    text = format_schema(DocumentedConfig, load_config(DocumentedConfig, None, ["steps=3"]))
    assert text.splitlines()[:4] == [
        "lr: float = 0.001", "    Peak learning rate, over two lines.",
        "steps: int = 3  (default 10)", "    a trailing comment is the fallback",
    ]
    assert "seed: int | null = null\n    (undocumented)\n" in text


def test_every_train_config_key_is_documented() -> None:
    from m2rl.config import schema_keys
    from m2rl.rl.trainer import TrainConfig

    undocumented = sorted(k.key for k in schema_keys(TrainConfig) if not k.doc)
    assert not undocumented, undocumented


def test_config_show_and_help_config_print_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from m2rl.cli import main

    assert main(["config", "show", "learner.loss.kind=grpo"]) == 0
    shown = capsys.readouterr().out
    assert "learner.loss.kind: cispo | grpo | dapo | gspo = grpo  (default cispo)\n" in shown
    assert "learner.lr: float = " in shown and "    Peak learning rate of AdamW" in shown
    assert main(["train", "--help-config", "learner.loss.kind=grpo"]) == 0
    assert capsys.readouterr().out == shown
    assert main(["config", "show", "learner.loss.name=grpo"]) == 2
    assert capsys.readouterr().err.startswith("m2rl: error: unknown config key 'learner.loss.name'")


# ------------------------------------------------------------------------------- override spellings


def test_plus_adds_a_key_the_file_does_not_set(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 20\n")
    assert load_config(ExampleConfig, path, ["+seed=3"]).seed == 3
    with pytest.raises(ConfigError, match=rf"override '\+steps=5': 'steps' is already set in {path} \(to 20\); "
                                          r"use steps=\.\.\. or \+\+steps=\.\.\. to change it"):
        load_config(ExampleConfig, path, ["+steps=5"])
    with pytest.raises(ConfigError, match=r"'\+seed=4': 'seed' is already set"):  # an earlier override set it
        load_config(ExampleConfig, path, ["+seed=3", "+seed=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'"):  # not in the schema: still an error
        load_config(ExampleConfig, path, ["+stepz=1"])


def test_plus_plus_adds_or_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 20\n")
    cfg = load_config(ExampleConfig, path, ["++steps=5", "++optim.lr=0.5"])
    assert (cfg.steps, cfg.optim.lr) == (5, 0.5)
    assert load_config(ExampleConfig, path, ["steps=5"]).steps == 5  # plain key=value: set, as ++ does
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.eta'"):
        load_config(ExampleConfig, path, ["++optim.eta=1"])
    with pytest.raises(ConfigError, match="bad override"):
        parse_override("+++steps=1")


def test_from_dict_onto_a_base_keeps_its_values() -> None:
    from m2rl.config import from_dict

    base = ExampleConfig(steps=7, optim=OptimConfig(lr=0.5))
    cfg = from_dict(ExampleConfig, {"name": "x", "optim": {"betas": [0.1, 0.2]}}, base=base)
    assert cfg == ExampleConfig(name="x", steps=7, optim=OptimConfig(lr=0.5, betas=(0.1, 0.2)))


@dataclass
class Clip:
    low: float = 0.0


@dataclass
class WithUnion:
    clip: Clip | None = None
    shaping: Literal["dense", "none"] | Clip = "dense"


def test_a_mapping_in_a_union_reports_the_nested_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'clip.lo'"):
        load_config(WithUnion, None, ["clip={lo: 1}"])
    with pytest.raises(ConfigError, match=r"config key 'shaping'.*: expected dense \| none \| Clip, got 'magic'"):
        load_config(WithUnion, None, ["shaping=magic"])


def test_tool_env_options_are_checked_by_the_config_loader() -> None:
    import gymnasium as gym
    import m2rl.envs  # noqa: F401  (registers the m2rl/* ids)

    env = gym.make("m2rl/Python-v0", kinds=["arith"], tool_timeout_s=4, control_tokens=["<x>"])
    try:
        config = env.unwrapped.config
        assert (config.kinds, config.tool_timeout_s, config.control_tokens) == (("arith",), 4.0, ("<x>",))
    finally:
        env.close()
    with pytest.raises(ConfigError, match=r"^config key 'max_steps' \(in ToolEnv options\): expected an integer"):
        gym.make("m2rl/Python-v0", max_steps="many")
    with pytest.raises(ConfigError, match=r"^unknown config key 'max_stepz' \(in ToolEnv options\); known keys here"):
        gym.make("m2rl/Python-v0", max_stepz=3)
