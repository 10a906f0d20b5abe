"""SCRIPTED POLICIES for BFCL (eval oracles, not models): replay BFCL's ground truth, or answer nothing.

- `bfcl_expert`: single-turn, the possible answer's calls with each parameter at its first accepted value
  (irrelevance: no call; live_relevance, which has no possible answer, a schema-valid call of the first
  function); multi-turn, each turn's ground-truth calls in order, then a reply with no call to end the turn
  (a turn whose ground truth is empty gets only that reply).
- `bfcl_empty`: never calls a function. BFCL's rules score it 100% on the irrelevance categories, 0% elsewhere.

Scripts follow m2rl.envs.experts: a generator over the task yielding each assistant turn's calls.
"""

from __future__ import annotations

from m2rl.envs.bfcl import convert
from m2rl.envs.bfcl.tasks import is_multi_turn
from m2rl.envs.experts import Script
from m2rl.envs.tasks.base import Task

CHUNK = 8  # calls per assistant turn (below the env's per-step limit)


def bfcl_expert(task: Task) -> Script:
    entry, answer = task.meta["entry"], task.meta["answer"]
    if not is_multi_turn(task.kind):
        if "irrelevance" in task.kind:
            yield []
        elif task.kind == "live_relevance":
            yield [convert.placeholder_call(convert.tool_specs(entry["function"])[0])]
        else:
            calls = convert.possible_answer_calls(answer["ground_truth"], entry["function"])
            if task.kind == "simple_java":  # Java parameters are Java source text (BFCL's prompt says so)
                properties = task.meta["checked_functions"][0]["parameters"]["properties"]
                calls = [(name, {k: convert.java_literal(v, properties.get(k, {})) for k, v in args.items()})
                         for name, args in calls]
            yield calls
        return
    for turn_calls in answer["ground_truth"]:
        calls = [convert.executable_call(text, entry["involved_classes"]) for text in turn_calls]
        for start in range(0, len(calls), CHUNK):
            yield calls[start:start + CHUNK]
        yield []


def bfcl_empty(task: Task) -> Script:
    while True:
        yield []
