"""BFCL's test entries as m2rl tasks: kind = BFCL category, seed = the entry's index in its category file.

Task ids are `bfcl/<category>/<index>` (e.g. `bfcl/multi_turn_base/17`; the BFCL id is `task.meta["bfcl_id"]`).
Splits are a hash of (category, index), as every m2rl task set splits (~20% test), so train and test never
share an entry; BFCL has no splits of its own.
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any

from m2rl.envs.bfcl.checker import load
from m2rl.envs.tasks.base import Task, TaskSet, Verification, split_of

SINGLE_TURN = (
    "simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple", "irrelevance",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance",
)
MULTI_TURN = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
CATEGORIES = SINGLE_TURN + MULTI_TURN
# BFCL v4 categories not offered, and why (docs/benchmark_envs.md):
NOT_RUN = {
    "web_search_base": "its backend queries SerpAPI and fetches live web pages (network, an API key)",
    "web_search_no_snippet": "its backend queries SerpAPI and fetches live web pages (network, an API key)",
    "memory_kv": "agentic memory: prerequisite conversations and answer checks not wrapped yet",
    "memory_vector": "needs sentence-transformers and faiss (heavy, pinned) besides the memory harness",
    "memory_rec_sum": "agentic memory: prerequisite conversations and answer checks not wrapped yet",
    "format_sensitivity": "non-scoring: varies BFCL's prompting-mode system prompt, not an FC task",
}
NO_ANSWER = ("irrelevance", "live_irrelevance", "live_relevance")  # graded by whether a call is made


def is_multi_turn(category: str) -> bool:
    return category.startswith("multi_turn")


@cache
def entries(category: str) -> tuple[dict[str, Any], ...]:
    """BFCL's test entries of `category` (function docs attached, as its own loader prepares them)."""
    if category not in CATEGORIES:
        raise KeyError(f"unknown BFCL category {category!r}; choose from {list(CATEGORIES)}"
                       + (f" ({category} is not offered: {NOT_RUN[category]})" if category in NOT_RUN else ""))
    return tuple(load().utils.load_dataset_entry(category))


@cache
def checked_functions(category: str) -> tuple[list[dict[str, Any]], ...]:
    """The function docs BFCL's checker reads: without the language hints `entries` adds for the prompt (its
    eval runner loads them so; for Java and JavaScript the hints rewrite every parameter type to string)."""
    return tuple(e["function"] for e in load().utils.load_dataset_entry(category, include_language_specific_hint=False))


@cache
def ground_truth(category: str) -> dict[str, Any]:
    """BFCL's possible answers of `category` by BFCL id (none for the (ir)relevance categories)."""
    if category in NO_ANSWER:
        return {}
    return {a["id"]: a for a in load().utils.load_ground_truth_entry(category)}


class BFCLTaskSet(TaskSet):
    family = "bfcl"
    kinds = CATEGORIES
    system_prompt = None  # BFCL gives FC models no system prompt of its own; an entry's system message is kept

    def generate(self, kind: str, seed: int) -> Task:
        all_entries = entries(kind)
        if not 0 <= seed < len(all_entries):
            raise KeyError(f"bfcl/{kind} has {len(all_entries)} entries; no index {seed}")
        entry = all_entries[seed]
        first_user = [m for m in entry["question"][0] if m.get("role") == "user"]
        return Task(
            id=self.task_id(kind, seed), family=self.family, kind=kind, seed=seed, split=self.split_of(kind, seed),
            prompt=str(first_user[-1]["content"]) if first_user else "",
            meta={"bfcl_id": entry["id"], "category": kind, "entry": entry, "checked_functions": checked_functions(kind)[seed],
                  "answer": ground_truth(kind).get(entry["id"])},
        )

    def split_of(self, kind: str, seed: int) -> str:
        return split_of(f"{self.family}/{kind}", seed)

    def indices(self, kind: str, split: str) -> list[int]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        return [i for i in range(len(entries(kind))) if self.split_of(kind, i) == split]

    def tasks(self, split: str, count: int, kinds: tuple[str, ...] | None = None) -> list[Task]:
        """The first `count` tasks of `split`, one category after the other in turn (all of them when `count`
        is at least the split's size)."""
        columns = [[(kind, i) for i in self.indices(kind, split)] for kind in (kinds or self.kinds)]
        picked: list[tuple[str, int]] = []
        for row in range(max((len(c) for c in columns), default=0)):
            picked += [column[row] for column in columns if row < len(column)]
        return [self.generate(kind, i) for kind, i in picked[:count]]

    def sample(self, split: str, rng: random.Random, kinds: tuple[str, ...] | None = None) -> Task:
        kinds = kinds or self.kinds
        kind = kinds[rng.randrange(len(kinds))]
        choices = self.indices(kind, split)
        return self.generate(kind, choices[rng.randrange(len(choices))])

    def grade(self, task: Task, sandbox: Any, answer: str | None) -> Verification:
        raise NotImplementedError("BFCL episodes are graded by BFCLEnv from the calls the policy made")
