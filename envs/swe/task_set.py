"""SWE-bench instances as a `TaskSet`: the prompt, the repository set-up at reset, and official grading.

A task's id is its instance id; its kind is the repository ("m2rl-factory/tinydb", "astropy/astropy"); its
split is the instance's. Set-up puts /testbed at the base commit with no history to mine
(`repository.prepare`). Grading takes the agent's `git diff` from its sandbox and grades it with
`grade_patch` in a FRESH sandbox of the same image, reset to the image's pristine state and prepared the
same way: whatever the agent left behind (processes, files outside the diff, a rewritten `.git`, edited
tests) cannot reach the verdict, and the hidden tests (test_patch) are applied only there.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from m2rl.envs.swe.instances import SWEInstance
from m2rl.envs.swe.repository import REPO_DIR, PreparedRepository, agent_diff, prepare
from m2rl.envs.tasks.base import SPLITS, Task, TaskSandbox, TaskSet
from m2rl.rewards.episode import RewardTask, Verification
from m2rl.rewards.grading import GradingTask, grade_patch, split_patch

SYSTEM_PROMPT = (
    "You are a software engineer working in a Python repository checked out at /testbed. You can run shell "
    "commands, view and edit files, and run Python. Shell state does not carry over between commands (each "
    "starts in /testbed), files do. There is no network access."
)
PROMPT = """<uploaded_files>
/testbed
</uploaded_files>
I've uploaded a Python code repository in the directory /testbed. Consider the following issue:

<issue_description>
{problem_statement}
</issue_description>

Make the minimal changes to the non-test files in /testbed so that the issue is resolved. The tests that \
check this already exist or will be added by the maintainers; do not modify any test files.
Follow these steps:
1. Explore the repository to find the code involved.
2. Reproduce the problem (for example with a short script, or by running the relevant tests with \
`python -m pytest`).
3. Edit the source code to fix it, and check that the fix works and nothing else broke.
4. Call `submit` when you are done."""
# The project's Python environment, which a login shell's /etc/profile takes off PATH: official images keep it
# in conda env "testbed", ours in the virtualenv their VIRTUAL_ENV names.
ACTIVATE_ENVIRONMENT = (
    "if [ -d /opt/miniconda3/envs/testbed ]; then source /opt/miniconda3/bin/activate && conda activate testbed; "
    'elif [ -n "${VIRTUAL_ENV:-}" ]; then export PATH="$VIRTUAL_ENV/bin:$PATH"; fi'
)

# Makes a fresh sandbox for an instance's image (the env owns the sandboxes and their reuse).
GraderSandbox = Callable[[SWEInstance], Any]


class SWETaskSet(TaskSet):
    family = "swe"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, instances: Sequence[SWEInstance], grader_sandbox: GraderSandbox | None = None,
                 repo_dir: str = REPO_DIR, grade_timeout_s: float = 900.0) -> None:
        if not instances:
            raise ValueError("SWETaskSet needs at least one instance")
        self.instances = {inst.instance_id: inst for inst in instances}
        if len(self.instances) != len(instances):
            raise ValueError("instance ids must be unique")
        self.kinds = tuple(sorted({inst.repo for inst in instances}))
        self.grader_sandbox = grader_sandbox
        self.repo_dir = repo_dir
        self.grade_timeout_s = grade_timeout_s
        # The repository each sandbox was prepared with (keyed by sandbox identity): the agent's diff is
        # taken against its base commit.
        self._prepared: dict[int, PreparedRepository] = {}

    # ------------------------------------------------------------------ task enumeration

    def instance(self, task: Task | str) -> SWEInstance:
        task_id = task if isinstance(task, str) else task.id
        try:
            return self.instances[task_id]
        except KeyError:
            raise KeyError(f"unknown SWE instance {task_id!r} ({len(self.instances)} loaded)") from None

    def _task(self, inst: SWEInstance, index: int) -> Task:
        return Task(
            id=inst.instance_id,
            family=self.family,
            kind=inst.repo,
            seed=index,
            split=inst.split,
            prompt=PROMPT.format(problem_statement=inst.problem_statement.strip()),
            meta={"repo": inst.repo, "image": inst.image},
        )

    def _of(self, split: str, kinds: tuple[str, ...] | None) -> list[SWEInstance]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        unknown = [k for k in kinds or () if k not in self.kinds]
        if unknown:
            raise ValueError(f"unknown repositories {unknown}; loaded: {list(self.kinds)}")
        chosen = [i for i in sorted(self.instances.values(), key=lambda i: i.instance_id) if i.split == split]
        return [i for i in chosen if not kinds or i.repo in kinds]

    def generate(self, kind: str, seed: int) -> Task:
        of_kind = self._of_any_split(kind)
        return self._task(of_kind[seed % len(of_kind)], seed)

    def _of_any_split(self, kind: str) -> list[SWEInstance]:
        of_kind = sorted((i for i in self.instances.values() if i.repo == kind), key=lambda i: i.instance_id)
        if not of_kind:
            raise ValueError(f"unknown repository {kind!r}; loaded: {list(self.kinds)}")
        return of_kind

    def get(self, task_id: str) -> Task:
        inst = self.instance(task_id)
        return self._task(inst, self._of_any_split(inst.repo).index(inst))

    def tasks(self, split: str, count: int, kinds: tuple[str, ...] | None = None) -> list[Task]:
        return [self.get(i.instance_id) for i in self._of(split, kinds)[:count]]

    def sample(self, split: str, rng: random.Random, kinds: tuple[str, ...] | None = None) -> Task:
        pool = self._of(split, kinds)
        if not pool:
            raise ValueError(f"no SWE instance in split {split!r}" + (f" for {list(kinds)}" if kinds else ""))
        return self.get(pool[rng.randrange(len(pool))].instance_id)

    # ------------------------------------------------------------------ episode

    def reward_task(self, task: Task) -> RewardTask:
        inst = self.instance(task)
        reference = tuple(dict.fromkeys(p for d in split_patch(inst.patch) for p in d.paths))
        tests = tuple(dict.fromkeys(p for d in split_patch(inst.test_patch) for p in d.paths))
        return RewardTask(target_tests=inst.FAIL_TO_PASS, reference_files=reference, test_paths=tests)

    def setup(self, task: Task, sandbox: TaskSandbox | None) -> None:
        if sandbox is None:
            raise ValueError("SWE tasks need a sandbox holding the repository image")
        self._prepared[id(sandbox)] = prepare(sandbox, self.instance(task).base_commit, self.repo_dir)

    def grading_task(self, inst: SWEInstance, prepared: PreparedRepository) -> GradingTask:
        return GradingTask(
            repo_dir=prepared.repo_dir,
            test_cmd=f"{ACTIVATE_ENVIRONMENT}; {inst.command}",
            fail_to_pass=inst.FAIL_TO_PASS,
            pass_to_pass=inst.PASS_TO_PASS,
            base_ref=prepared.head,
            test_patch=inst.test_patch,
            log_parser=inst.log_parser,
            eval_type=inst.eval_type,
            instance_id=inst.instance_id,
            repo=inst.repo,
            version=inst.version,
            timeout_s=self.grade_timeout_s,
        )

    def grade(self, task: Task, sandbox: TaskSandbox | None, answer: str | None) -> Verification:
        """The agent's diff, graded in a fresh sandbox of the same image (the caller killed the agent's
        processes first)."""
        prepared = self._prepared.get(id(sandbox))
        if sandbox is None or prepared is None:
            raise ValueError(f"task {task.id} was not set up in this sandbox; nothing to grade")
        patch = agent_diff(sandbox, prepared)
        return self.grade_patch(self.instance(task), patch)

    def grade_patch(self, inst: SWEInstance, patch: str) -> Verification:
        """Grade `patch` for `inst` in a fresh sandbox (also what `m2rl tasks validate` runs)."""
        if self.grader_sandbox is None:
            raise ValueError("this SWETaskSet has no grader sandbox factory; SWEEnv provides one")
        grader = self.grader_sandbox(inst)
        prepared = prepare(grader, inst.base_commit, self.repo_dir)
        result = grade_patch(grader, patch, self.grading_task(inst, prepared))
        detail = result.details if result.applied else f"{result.details}: {result.log[-600:]}"
        return Verification(result.resolved, result.score, detail, result.exit_code, patch=patch)

    def forget(self, sandbox: Any) -> None:
        """Drop what was recorded about a sandbox that is closed."""
        self._prepared.pop(id(sandbox), None)

