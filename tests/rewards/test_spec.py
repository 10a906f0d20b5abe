"""RewardSpec: defaults from the design brief, YAML round trip, clear errors."""

import pytest
import yaml
from m2rl.config import ConfigError
from m2rl.rewards.spec import DEFAULT_WEIGHTS, RewardSpec, RewardSpecError


def test_default_weights_match_the_design_brief():
    w = RewardSpec.default().weights
    assert w["valid_tool_call"] == 0.05
    assert w["relevant_file"] == 0.03
    assert w["valid_syntax"] == 0.02
    assert w["test_progress"] == 0.04
    assert w["resolved"] == 1.0
    assert w["invalid_tool_call"] == -0.05
    assert w["syntax_error"] == -0.03
    assert w["timeout"] == -0.1
    assert RewardSpec.default().shaping == "dense"


def test_yaml_round_trip():
    spec = RewardSpec.from_dict(
        {
            "components": {"resolved": 1.0, "test_progress": 0.1},
            "shaping": {"mode": "potential", "gamma": 0.9},
            "clip": {"step": [-0.2, 0.2], "dense_total": None, "total": [-1, 2]},
            "detectors": ["test_tampering"],
            "void_outcome_on": ["test_tampering"],
            "numeric_tolerance": 0.01,
        }
    )
    assert spec.weights == {"resolved": 1.0, "test_progress": 0.1}
    assert spec.shaping == "potential" and spec.gamma == 0.9
    assert spec.step_clip == (-0.2, 0.2) and spec.dense_total_clip is None and spec.total_clip == (-1.0, 2.0)
    text = yaml.safe_dump(spec.to_dict())
    assert RewardSpec.from_dict(yaml.safe_load(text)) == spec
    assert (
        RewardSpec.from_dict(yaml.safe_load(yaml.safe_dump(RewardSpec.default().to_dict()))) == RewardSpec()
    )


def test_partial_dict_keeps_defaults():
    spec = RewardSpec.from_dict({"gamma": 0.5})
    assert spec.weights == DEFAULT_WEIGHTS and spec.gamma == 0.5
    assert RewardSpec.from_dict(None) == RewardSpec()
    assert RewardSpec.from_dict({"components": {}}).weights == {}


@pytest.mark.parametrize(
    "d, needle",
    [
        ({"components": {"resolvd": 1.0}}, "unknown reward component 'resolvd'"),
        ({"components": {"resolved": "high"}}, "config key 'components.resolved': expected a number"),
        ({"components": {"resolved": True}}, "config key 'components.resolved': expected a number"),
        ({"components": {"resolved": None}}, "config key 'components.resolved': expected a number"),
        ({"components": {"resolved": float("nan")}}, "must be finite"),
        ({"components": ["resolved"]}, "config key 'components': expected a mapping"),
        ({"clip": {"step": [1.0, -1.0]}}, r"clip.step: clip range \[1.0, -1.0\] is negative"),
        ({"clip": {"dense_total": [0.5]}}, "config key 'clip.dense_total': expected 2 items, got 1"),
        ({"clip": {"total": ["a", 1]}}, r"config key 'clip.total\[0\]': expected a number"),
        ({"clip": {"stp": [0, 1]}}, "unknown config key 'clip.stp'; known keys here: dense_total, step, total"),
        ({"shaping": "magic"}, r"config key 'shaping': expected dense \| potential \| none \| ShapingConfig"),
        ({"shaping": {"mode": "potential", "gamma": 0}}, "gamma must be in"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"detectors": ["telepathy"]}, "unknown detector 'telepathy'"),
        ({"void_outcome_on": "test_tampering"}, "config key 'void_outcome_on': expected a list"),
        ({"numeric_tolerance": -1}, "numeric_tolerance must be >= 0"),
        ({"weights": {}}, r"unknown config key 'weights'; known keys here: clip, components, detectors"),
        ([1, 2], "reward spec must be a mapping"),
    ],
)
def test_bad_specs_are_clear_errors(d, needle):
    with pytest.raises(RewardSpecError, match=needle):
        RewardSpec.from_dict(d)


def test_errors_name_the_file_and_section():
    # RewardSpec is built by m2rl.config, so its errors read like every config error: key and file.
    with pytest.raises(RewardSpecError, match=r"unknown config key 'rewards.shapin' \(in train.yaml\)"):
        RewardSpec.from_dict({"shapin": "dense"}, source="train.yaml", prefix="rewards.")
    with pytest.raises(RewardSpecError, match=r"\(in train.yaml\) at 'rewards.': unknown reward component 'resolvd'"):
        RewardSpec.from_dict({"components": {"resolvd": 1.0}}, source="train.yaml", prefix="rewards.")
    with pytest.raises(ConfigError):  # a RewardSpecError is a ConfigError: `m2rl` prints it as one line
        RewardSpec.from_dict({"gamma": 2.0})


def test_the_yaml_form_is_a_documented_config_dataclass():
    from m2rl.config import schema_keys
    from m2rl.rewards.spec import RewardConfig

    keys = {k.key: k for k in schema_keys(RewardConfig)}
    assert {"components", "shaping", "gamma", "clip.step", "clip.dense_total", "clip.total", "detectors",
            "void_outcome_on", "numeric_tolerance"} <= set(keys)
    assert all(k.doc for k in keys.values())
    assert RewardSpec.from_dict(read_default_yaml()) == RewardSpec()


def read_default_yaml():
    from pathlib import Path

    return yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "rewards" / "default.yaml").read_text())


def test_direct_construction_is_validated_too():
    with pytest.raises(RewardSpecError, match="unknown reward component 'bogus'"):
        RewardSpec(weights={"bogus": 1.0})
    with pytest.raises(RewardSpecError, match="negative"):
        RewardSpec(step_clip=(0.1, -0.1))
    assert issubclass(RewardSpecError, ValueError)
