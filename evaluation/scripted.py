"""`scripted:NAME` policies: the task families' scripted experts and wrong policies, by name.

They are the eval's oracles: `scripted:expert` must resolve every task of its family and `scripted:wrong` none,
so an eval of them checks the harness itself end to end (env, grader, records, report). Each is played through
the same agent loop as a model, by rl/sft.py's `ExpertPolicy` on an env wrapped in its `RecordInfo` (the
script reads the tool outputs of its previous turn from there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from m2rl.envs.experts import Script, ScriptFn
from m2rl.envs.tasks.base import Task

ScriptFactory = Callable[[Any], ScriptFn]  # the env (SWE's expert needs its instances) -> the script


def submit_nothing(task: Task) -> Script:
    """Hands in at once, having changed nothing: scores 0 wherever the grader checks the work."""
    yield [("submit", {"answer": "done"})]


def _python() -> dict[str, ScriptFactory]:
    from m2rl.envs.experts import python_expert, python_mental_arith, python_wrong

    return {"expert": lambda env: python_expert, "wrong": lambda env: python_wrong,
            "mental_arith": lambda env: python_mental_arith}


def _shell() -> dict[str, ScriptFactory]:
    from m2rl.envs.experts import shell_expert, shell_wrong

    return {"expert": lambda env: shell_expert, "wrong": lambda env: shell_wrong}


def _browser() -> dict[str, ScriptFactory]:
    from m2rl.envs.experts_web import browser_expert, browser_wrong

    return {"expert": lambda env: browser_expert, "wrong": lambda env: browser_wrong}


def _mcp() -> dict[str, ScriptFactory]:
    from m2rl.envs.experts_web import mcp_expert, mcp_wrong

    return {"expert": lambda env: mcp_expert, "wrong": lambda env: mcp_wrong}


def _miniwob() -> dict[str, ScriptFactory]:
    from m2rl.envs.miniwob.experts import miniwob_expert, miniwob_random

    return {"expert": lambda env: miniwob_expert, "random": lambda env: miniwob_random}


def _swe() -> dict[str, ScriptFactory]:
    from m2rl.envs.swe.expert import gold_patch_script

    return {"expert": gold_patch_script, "wrong": lambda env: submit_nothing}


def _bfcl() -> dict[str, ScriptFactory]:
    from m2rl.envs.bfcl.expert import bfcl_empty, bfcl_expert

    return {"expert": lambda env: bfcl_expert, "empty": lambda env: bfcl_empty}


FAMILIES: dict[str, Callable[[], dict[str, ScriptFactory]]] = {
    "python": _python, "shell": _shell, "browser": _browser, "mcp": _mcp, "swe": _swe, "bfcl": _bfcl,
    "miniwob": _miniwob,
}


def script_names(family: str) -> list[str]:
    return sorted(FAMILIES[family]()) if family in FAMILIES else []


def script_factory(family: str, name: str) -> ScriptFactory:
    """The script `name` of `family`; ValueError naming the ones there are."""
    if family not in FAMILIES:
        raise ValueError(f"no scripted policies for task family {family!r}; families with scripts: "
                         f"{', '.join(sorted(FAMILIES))}")
    scripts = FAMILIES[family]()
    if name not in scripts:
        raise ValueError(f"no scripted policy {name!r} for task family {family!r}; choose one of "
                         f"{', '.join(sorted(scripts))}")
    return scripts[name]
