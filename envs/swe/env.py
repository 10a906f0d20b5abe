"""`m2rl/SWE-v0`: SWE-bench instances in Docker, with bash, the file editor, Python and submit.

    env = gymnasium.make("m2rl/SWE-v0", instances="tasks/swe-starter", sandbox="docker")

Each instance runs in a sandbox of its own image with the repository at /testbed (a capped tmpfs seeded
from the image). The env keeps its sandbox while consecutive episodes use the same image: a reset then
restores the writable roots from the executor's snapshot and re-prepares the repository, with no new
container. Grading runs in a second, fresh sandbox of the same image (one kept per image, reset before
each grade). Test runs the agent makes are parsed with the instance's swebench log parser, for the
`test_progress` reward; pytest prints every result (`PYTEST_ADDOPTS=-rA`) so passes can be read too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m2rl.envs.swe.images import ImageBuilder, resolve_image
from m2rl.envs.swe.instances import SWEInstance, load_instances
from m2rl.envs.swe.repository import REPO_DIR
from m2rl.envs.swe.task_set import SWETaskSet
from m2rl.envs.tool import ToolOutput
from m2rl.envs.tool_env import ToolEnv
from m2rl.envs.tools import EditorTool, PythonTool, submit
from m2rl.envs.tools.bash import BashTool
from m2rl.sandboxes import SandboxError, make_sandbox
from m2rl.sandboxes.limits import Limits
from swebench.harness.constants import TestStatus
from swebench.harness.log_parsers import PARSER_REGISTRY
from swebench.types import TestSpec

logger = logging.getLogger(__name__)

# A repository's test suite needs more room and time than a shell task.
SWE_LIMITS = Limits(memory_mb=2048, disk_mb=1024, pids=512)
SWE_DEFAULTS: dict[str, Any] = {"max_steps": 40, "tool_timeout_s": 120.0, "max_output_chars": 12_000}
FAILED_STATES = (TestStatus.FAILED.value, TestStatus.ERROR.value)
# Grading sandboxes kept warm per env, one per image, least recently used closed first: a task set spanning
# many repositories must not keep a container of every one alive.
MAX_WARM_GRADERS = 4


class TestReportingBash(BashTool):
    """bash that also reads the test results out of what a command printed (with the instance's swebench
    log parser), so a step that runs the tests reports which passed and failed."""

    __test__ = False  # not a pytest test class

    def __init__(self, sandbox: Any, timeout_s: float, instance: SWEInstance) -> None:
        super().__init__(sandbox, timeout_s, workdir=REPO_DIR, env={"PYTEST_ADDOPTS": "-rA"})
        self.instance = instance

    def bash(self, command: str) -> ToolOutput:
        out = super().bash(command)
        spec = TestSpec(instance_id=self.instance.instance_id, image="", eval_script_list=[],
                        repo=self.instance.repo, version=self.instance.version, FAIL_TO_PASS=[], PASS_TO_PASS=[],
                        log_parser=self.instance.log_parser)
        try:
            statuses = PARSER_REGISTRY[self.instance.log_parser](out.output, spec)
        except Exception:  # a parser choking on arbitrary output means: no test results
            logger.debug("the %s parser failed on a command's output", self.instance.log_parser, exc_info=True)
            statuses = {}
        if statuses:
            out.tests = {
                "passed": sorted(t for t, s in statuses.items() if s == TestStatus.PASSED.value),
                "failed": sorted(t for t, s in statuses.items() if s in FAILED_STATES),
            }
        return out

    # The spec the model reads names the repository as the working directory.
    bash.__doc__ = (BashTool.bash.__doc__ or "").replace("(working directory /work)", f"(working directory {REPO_DIR})")


class RepositoryPython(PythonTool):
    """The python tool, its interpreter started in the repository."""

    def python(self, code: str) -> ToolOutput:
        return super().python(code)

    python.__doc__ = (PythonTool.python.__doc__ or "").replace("(working directory /work)", f"(working directory {REPO_DIR})")


def swe_tools(env: ToolEnv) -> list[Any]:
    assert isinstance(env, SWEEnv) and env.task is not None
    instance = env.task_set.instance(env.task)
    timeout = env.config.tool_timeout_s
    return [
        TestReportingBash(env.sandbox, timeout, instance).bash,
        EditorTool(env.sandbox, workdir=REPO_DIR).str_replace_editor,
        RepositoryPython(env.sandbox, timeout, workdir=REPO_DIR).python,
        submit,
    ]


class SWEEnv(ToolEnv):
    """A `ToolEnv` whose sandbox image follows the instance (see the module docstring)."""

    task_set: SWETaskSet
    sandbox: Any

    def __init__(self, task_set: SWETaskSet, *, image_builder: ImageBuilder | None = None, **kwargs: Any) -> None:
        self._images: dict[str, str] = {}  # instance id -> resolved image
        self._image_builder = image_builder
        self._sandbox_image: str | None = None
        self._graders: OrderedDict[str, Any] = OrderedDict()  # image -> its grading sandbox, oldest use first
        task_set.grader_sandbox = self._grader_for
        super().__init__(task_set, swe_tools, **kwargs)
        if self.backend != "docker":
            raise SandboxError(f"m2rl/SWE-v0 runs repositories in Docker images; sandbox={self.backend!r} cannot")

    def image_of(self, instance: SWEInstance) -> str:
        if instance.instance_id not in self._images:
            self._images[instance.instance_id] = resolve_image(instance, self._image_builder)
        return self._images[instance.instance_id]

    def _start_sandbox(self, image: str) -> Any:
        return make_sandbox("docker", image=image, limits=self.sandbox_limits or SWE_LIMITS,
                            extra_roots=(REPO_DIR,), **self.sandbox_options)

    def _prepare_sandbox(self) -> None:
        assert self.task is not None
        image = self.image_of(self.task_set.instance(self.task))
        if self.sandbox is not None and self._sandbox_image == image:
            try:
                self.sandbox.reset()
                return
            except SandboxError:  # dead, or its state cannot be restored: never reuse it
                logger.warning("the SWE sandbox could not be reset; starting a new one", exc_info=True)
        self._drop_sandbox()
        self._adopt_sandbox(self._start_sandbox(image))
        self._sandbox_image = image

    def _drop_sandbox(self) -> None:
        if self.sandbox is not None:
            self.task_set.forget(self.sandbox)
        self._sandbox_image = None
        super()._drop_sandbox()

    def _grader_for(self, instance: SWEInstance) -> Any:
        """A fresh sandbox of the instance's image: the kept one, reset to the image's state, or a new one."""
        image = self.image_of(instance)
        grader = self._graders.pop(image, None)
        if grader is not None:
            try:
                grader.reset()
            except SandboxError:
                logger.warning("the grading sandbox could not be reset; starting a new one", exc_info=True)
                _close_quietly(grader)
                grader = None
        if grader is None:
            grader = self._start_sandbox(image)
        with self._sandbox_lock:
            closed = self._closed
            if not closed:
                self._graders[image] = grader  # (re)inserted last: the most recently used
        if closed:  # close() ran while the grader started (an abandoned episode's thread): nobody would close it
            _close_quietly(grader)
            raise SandboxError("the env was closed while its grading sandbox was starting")
        while len(self._graders) > MAX_WARM_GRADERS:
            _close_quietly(self._graders.popitem(last=False)[1])
        return grader

    def close(self) -> None:
        super().close()
        for grader in self._graders.values():
            _close_quietly(grader)
        self._graders.clear()


def _close_quietly(sandbox: Any) -> None:
    try:
        sandbox.close()
    except Exception:  # a dead sandbox is dropped either way
        logger.debug("closing a sandbox failed", exc_info=True)


# The validated set shipped with the package: what `gym.make("m2rl/SWE-v0")` plays when given no instances.
STARTER_TASKS = Path(__file__).resolve().parents[2] / "tasks" / "swe-starter"


def make_swe_env(
    instances: str | Path | Sequence[SWEInstance] = STARTER_TASKS,
    sandbox: str = "docker",
    *,
    repos: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    count: int | None = None,
    grade_timeout_s: float = 900.0,
    image_builder: ImageBuilder | None = None,
    backend: str | None = None,
    **kwargs: Any,
) -> SWEEnv:
    """`gymnasium.make("m2rl/SWE-v0", instances=PATH_OR_NAME, sandbox="docker", ...)` lands here.

    `instances`: a JSON/JSONL/parquet file, a task directory (its instances.jsonl), a saved dataset, a
    SWE-bench name with a local copy ("lite", "verified"), or SWEInstance objects (default: the shipped
    starter set, tasks/swe-starter); `repos`/`ids`/`count`
    filter them. Other keyword arguments are `ToolEnv`'s (split, max_steps, tool_timeout_s, reward_spec,
    sandbox_limits, ...). A task directory's images are rebuilt from its recipes when missing."""
    if isinstance(instances, (str, Path)):
        loaded = load_instances(instances, repos=repos, ids=ids, count=count)
        if image_builder is None and (Path(instances) / "images.json").is_file():
            from m2rl.envs.swe.factory.rebuild import recipe_builder

            image_builder = recipe_builder(Path(instances))
    else:
        loaded = list(instances)
    options = {**SWE_DEFAULTS, **kwargs}
    return SWEEnv(SWETaskSet(loaded, grade_timeout_s=grade_timeout_s), image_builder=image_builder,
                  backend=backend or sandbox, **options)
