"""pyproject.toml's version bounds: the ones that matter exclude the releases that lack what m2rl calls, and the
installed environment satisfies every requirement line.

Each pinned bound comes with the oldest release that breaks (it must be excluded) and the first that works (it
must be admitted); the API checks below name what the code calls, so a bound and its reason are tested together.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _requirements() -> dict[str, list[Requirement]]:
    """Requirement lines by group: "core", "build" and each optional extra."""
    data = _project()
    groups = {"core": data["project"]["dependencies"], "build": data["build-system"]["requires"],
              **data["project"]["optional-dependencies"]}
    return {group: [Requirement(line) for line in lines] for group, lines in groups.items()}


def _find(name: str) -> Requirement:
    found = [r for reqs in _requirements().values() for r in reqs if r.name.lower() == name]
    assert len(found) == 1, f"{name} should be required exactly once in pyproject.toml, found {found}"
    return found[0]


# (distribution, a release that lacks what we call: excluded, the first release that has it: admitted)
BOUNDS = [
    ("swebench", "4.1.0", "5.0.0"),  # TestSpec(log_parser=...) and swebench.types arrived in 5.0
    ("swebench", "4.0.5", "5.0.2"),
    ("swebench", "6.0.0", "5.9.0"),  # a next major may move the harness API again
    ("mcp", "1.30.0", "2.0.0"),  # mcp.Client, streamable_http_client, mcp.server.mcpserver are v2 names
    ("mcp", "3.0.0", "2.3.0"),
    ("transformers", "4.57.1", "5.0.0"),  # MiniMaxM2ForCausalLM, chat_template.jinja files
    ("docker", "7.0.0", "7.1.0"),  # 7.0 breaks with requests >= 2.32.2
    ("jinja2", "3.0.3", "3.1.0"),  # transformers' apply_chat_template refuses Jinja < 3.1
    ("trl", "1.6.0", "1.7.0"),  # GRPOConfig.router_aux_loss_coef
    ("vllm", "0.11.0", "0.32.0"),  # MiniMax-M2 and its parsers are missing from 0.11.0
    ("setuptools", "76.0.0", "77.0.0"),  # `license = "Apache-2.0"` (PEP 639) needs setuptools 77
]


@pytest.mark.parametrize("name, excluded, admitted", BOUNDS)
def test_bounds_exclude_releases_lacking_what_we_call(name, excluded, admitted):
    spec = _find(name).specifier
    assert not spec.contains(excluded, prereleases=True), f"{name}{spec} admits {excluded}"
    assert spec.contains(admitted, prereleases=True), f"{name}{spec} rejects {admitted}"


def test_installed_versions_satisfy_every_requirement():
    # Core and build requirements must be installed; an extra's package may be absent (gpu extra on a CPU
    # machine), but where it is installed its version must fit.
    problems = []
    for group, reqs in _requirements().items():
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate({"extra": group}):
                continue
            try:
                installed = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                if group == "core":
                    problems.append(f"{req} ({group}): not installed")
                continue
            if not req.specifier.contains(Version(installed), prereleases=True):
                problems.append(f"{req} ({group}): installed {installed}")
    assert not problems, "installed versions violate pyproject.toml:\n" + "\n".join(problems)


# ---- what the bounds protect: the APIs the code calls, in the installed versions ----

def test_swebench_has_what_grading_calls():
    from swebench.harness.log_parsers import PARSER_REGISTRY
    from swebench.types import TestSpec

    assert "log_parser" in {f.name for f in dataclasses.fields(TestSpec)}
    assert "parse_log_pytest" in PARSER_REGISTRY
    import m2rl.rewards.grading  # noqa: F401  (imports the rest of the harness names it uses)


def test_mcp_has_the_v2_names():
    mcp = pytest.importorskip("mcp")
    from mcp.client.streamable_http import streamable_http_client  # noqa: F401
    from mcp.server.mcpserver import MCPServer  # noqa: F401

    assert hasattr(mcp, "Client")


def test_transformers_has_minimax_m2():
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM  # noqa: F401


def test_docker_adapter_works_with_new_requests():
    # requests >= 2.32.2 calls get_connection_with_tls_context; docker 7.0's adapter lacks it.
    from docker.transport.basehttpadapter import BaseHTTPAdapter

    assert "get_connection_with_tls_context" in vars(BaseHTTPAdapter)


def test_trl_grpo_config_has_what_the_benchmark_sets():
    trl = pytest.importorskip("trl")
    assert "router_aux_loss_coef" in {f.name for f in dataclasses.fields(trl.GRPOConfig)}
