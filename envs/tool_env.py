"""`ToolEnv`: a Gymnasium env whose action is the policy's raw text and whose observation is the env's reply.

Episode shape (token-in, token-out, see shared/reference/m2-format.md):
- `reset()` picks a task (deterministic in the seed), prepares a sandbox, builds the tools and returns
  the rendered prompt `render(system + user, tools, add_generation_prompt=True)`.
- `step(text)` parses the assistant text the policy sampled after that prompt, runs its tool calls in
  order, and returns `render_tool_suffix(results)`: exactly the text to append after the sampled tokens.
  If the sampled text did not end with the EOS marker (cut at max tokens), the observation starts with
  `[e~[` so the transcript stays a valid rendering.
- `submit(answer)` (or a reply with no tool call, whose content is taken as the final answer) ends the
  episode; the task set's grader scores it outside anything the agent could write.

Nothing the policy writes makes `step()` raise: malformed calls, unknown tools, schema violations and tool
timeouts become tool responses plus `info["errors"]`; a dead sandbox truncates with `info["error"]`.

Every step costs at most what its size limits allow:
- an action longer than `max_action_chars` is not parsed: its reply is one format error, nothing runs, and
  the episode goes on (a step like any other: it counts towards `max_steps`);
- argument values nest at most 32 levels (`m2rl.agent.schema.MAX_VALUE_DEPTH`; deeper is a schema error);
- rewards are scored incrementally: the detectors read the new step only (earlier hits are kept), and
  their hits on this step are `info["detectors"]` ({detector: [evidence]}, empty when clean);
- each tool response is clipped to `max_output_chars` and the whole observation fits
  `max_observation_chars` (responses are clipped further rather than cutting the rendered suffix).
Environment text (tool output, error messages quoting the agent) is passed through `neutralize_markers`
with the format's structure markers plus `config.control_tokens`, so it never encodes to a control token.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from m2rl.agent.format import EOS, neutralize_markers, parse, render, render_tool_suffix
from m2rl.config import from_dict as config_from_dict
from m2rl.envs.spaces import UnicodeText
from m2rl.envs.tasks.base import Task, TaskSet, Verification
from m2rl.envs.tool import Tool, ToolError, ToolOutput, closed_spec
from m2rl.envs.tools.editor import python_syntax_ok
from m2rl.rewards import RewardSpec, StepInfo, compute_episode_rewards
from m2rl.rewards.detectors import DetectorHit, run_detectors
from m2rl.rewards.episode import ERROR_KINDS
from m2rl.sandboxes import SandboxDead, SandboxError, make_sandbox

logger = logging.getLogger(__name__)

# Builds an episode's tools, called at every reset with the env (after the sandbox is ready and the task
# is set: read env.sandbox, env.task, env.config). Returns callables (typed functions, bound methods) or
# `Tool`s. Objects owning bound-method tools get `close()` called when the episode ends.
ToolsFactory = Callable[["ToolEnv"], Sequence[Callable[..., Any] | Tool]]


@dataclass
class ToolEnvConfig:
    split: str = "train"
    kinds: tuple[str, ...] | None = None  # restrict the task kinds sampled (None = all)
    max_steps: int = 16  # assistant turns before truncation
    max_tool_calls_per_step: int = 8  # further parallel calls are refused (bounds the observation size)
    max_output_chars: int = 12_000  # one tool response; the middle is cut beyond this
    max_observation_chars: int = 131_072  # the observation space's declared maximum length
    max_action_chars: int = 1_048_576  # a longer action is refused unparsed (one format error)
    tool_timeout_s: float = 30.0  # per tool call (bash command, python cell)
    enable_thinking: bool = True
    text_reply_is_answer: bool = True  # a reply with no tool call ends the episode with its content as answer
    system_prompt: str | None = None  # None: the task set's system prompt
    # Special tokens of the policy's tokenizer beyond the M2 markers (`control_tokens(tokenizer)` of
    # m2rl.agent.format): neutralised in env text too. The shipped tokenizers need none.
    control_tokens: tuple[str, ...] = ()
    # Python files a shell command or code cell wrote are read back and compiled, so `syntax_error` and
    # `valid_syntax` score them as they score the editor's edits (at most this many files per call).
    max_syntax_checks: int = 16


_CLIP_NOTE_CHARS = 48  # what `clip_middle` adds beyond its limit: "\n[... N characters truncated ...]\n"


def clip_middle(text: str, limit: int) -> str:
    """Keep the head and tail of long output (errors usually sit at the end)."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters truncated ...]\n{text[-tail:]}"


def clean_text(text: str) -> str:
    """Lone surrogates (from undecodable bytes) cannot be tokenized or encoded: replace them."""
    return text.encode("utf-8", "replace").decode("utf-8")


def empty_info() -> dict[str, Any]:
    """The info of a step before it did anything: the dict form of an empty `StepInfo`, the contract
    (rewards/episode.py) that `step()` fills and checks its info against before returning it."""
    info = StepInfo().to_dict()
    # Timings hold only work that happened (tool calls, grading): a step that ran nothing reports 0.0, so
    # identical actions give identical infos (Gymnasium's step-determinism check compares infos).
    info["timings"]["sandbox_s"] = 0.0
    return info


class ToolEnv(gym.Env[str, str]):
    """A tool-use environment over a `TaskSet`, a tools factory, a sandbox backend and a reward spec.

    Args:
        task_set: where tasks come from and how they are graded.
        tools: builds the episode's tools: `tools(env) -> [callable | Tool]`, called at every reset.
        backend: sandbox backend ("bwrap", "docker", "auto") or None for an env without a sandbox.
        image, sandbox_limits, sandbox_options: passed to `make_sandbox`.
        pool: a `SandboxPool` to acquire sandboxes from instead of creating one.
        reward_spec: turns each step's info into `{component: value}`; None = the default spec.
        render_mode: None or "ansi" (render() returns the transcript so far).
        config / **overrides: `ToolEnvConfig` and overrides of its fields (split=, max_steps=, ...).
    """

    # "ansi" renders the transcript; text has no frame rate, 1 is declared for Gymnasium's checker.
    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        task_set: TaskSet,
        tools: ToolsFactory,
        *,
        backend: str | None = "bwrap",
        image: str | None = None,
        sandbox_limits: Any = None,
        sandbox_options: dict[str, Any] | None = None,
        pool: Any = None,
        reward_spec: Any = None,
        render_mode: str | None = None,
        config: ToolEnvConfig | None = None,
        **overrides: Any,
    ) -> None:
        # Options are checked by m2rl.config like every config: an unknown option, a wrong type or a bad value
        # is a ConfigError naming the option (lists become the tuples the fields hold).
        self.config = config_from_dict(ToolEnvConfig, overrides, source="ToolEnv options", base=config or ToolEnvConfig())
        if self.config.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.config.split!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode {render_mode!r} not supported; use one of {self.metadata['render_modes']}"
            )
        self.task_set = task_set
        self.tools_factory = tools
        self.backend = backend
        self.image = image
        self.sandbox_limits = sandbox_limits
        self.sandbox_options = dict(sandbox_options or {})
        self.pool = pool
        self.reward_spec = make_reward_spec(reward_spec)
        self.render_mode = render_mode
        self.observation_space = UnicodeText(self.config.max_observation_chars)
        self.action_space = UnicodeText(self.config.max_action_chars)

        self.sandbox: Any = None
        # close() may run on another thread while a reset() starts a sandbox (an abandoned episode's worker
        # thread): the lock orders the two, and `_closed` tells reset that the sandbox it made has no owner.
        self._sandbox_lock = threading.Lock()
        self._closed = False
        self.task: Task | None = None
        self._tools: dict[str, Tool] = {}
        self._messages: list[dict[str, Any]] = []
        self._transcript: list[str] = []
        self._steps = 0
        self._done = True
        self._step_views: list[StepInfo] = []  # the episode's infos as rewards read them
        self._detector_hits: list[DetectorHit] = []  # of those steps: each step is analysed once

    # ------------------------------------------------------------------ structured views of the prompt

    def prompt_messages(self) -> list[dict[str, Any]]:
        """The system and user messages of the current episode (the first observation renders them)."""
        return [dict(m) for m in self._messages]

    def tools_spec(self) -> list[dict[str, Any]]:
        """OpenAI function specs of the current episode's tools, in the order the prompt lists them."""
        return [_deep_copy(t.spec) for t in self._tools.values()]

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        with self._sandbox_lock:
            self._closed = False  # gymnasium lets a closed env be reset: it reopens
        self._close_episode()
        self.task = self._pick_task(options)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self._prepare_sandbox()
        self._setup_task(self.task)
        timings["sandbox_s"] = time.perf_counter() - t0
        self._tools = {}
        for fn in self.tools_factory(self):
            tool = Tool.of(fn)
            if tool.name in self._tools:
                raise ValueError(f"two tools are named {tool.name!r}; tool names must be unique")
            self._tools[tool.name] = tool
        self._messages = self._initial_messages(self.task)
        obs = render(
            self._messages,
            tools=self.tools_spec(),
            add_generation_prompt=True,
            enable_thinking=self.config.enable_thinking,
        )
        if len(obs) > self.config.max_observation_chars:
            raise ValueError(
                f"the prompt of task {self.task.id} has {len(obs)} characters, more than "
                f"max_observation_chars={self.config.max_observation_chars}; raise that limit"
            )
        self._steps = 0
        self._done = False
        self._step_views, self._detector_hits = [], []
        self._transcript = [obs]
        info = {"task_id": self.task.id, "split": self.task.split, "timings": timings}
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        info = empty_info()
        if self._done or self.task is None:
            msg = "The episode is over; call reset() to start a new one."
            info["errors"].append({"kind": "format", "message": msg})
            return msg, 0.0, True, False, StepInfo.from_dict(info).to_dict()
        text = action if isinstance(action, str) else str(action)
        self._steps += 1
        responses, terminated, truncated = self._act(text, info)
        # Exactly the strings the observation renders (the agent rebuilds tool messages from them).
        responses = [neutralize_markers(clean_text(r), self.config.control_tokens) for r in responses]
        responses = self._fit_observation(text, responses)
        if not terminated and not truncated and self._steps >= self.config.max_steps:
            truncated = True
        if (terminated or truncated) and "error" not in info:
            self._grade(info)
            if "error" in info:  # the sandbox died under the grader: no verdict, a truncated episode
                terminated, truncated = False, True
        self._done = terminated or truncated
        info["reward_breakdown"] = self._reward_breakdown(info)
        reward = float(sum(info["reward_breakdown"].values()))
        obs = self._observation(text, responses)
        info["responses"] = responses
        # A refused over-long action is kept clipped: render() is for reading, not a copy of every byte.
        self._transcript.append(clip_middle(text, self.config.max_action_chars))
        self._transcript.append(obs)
        # What leaves the env is a StepInfo's dict form: an info that breaks the contract raises here, in the
        # env that built it, not later in the learner.
        return obs, reward, terminated, truncated, StepInfo.from_dict(info, self._steps - 1).to_dict()

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return "".join(self._transcript)
        return None

    def close(self) -> None:
        with self._sandbox_lock:
            self._closed = True
        self._close_episode()
        self._drop_sandbox()
        super().close()

    def _drop_sandbox(self) -> None:
        """Give the sandbox back (to the pool, which resets it and discards it if that fails) or close it;
        dead ones included."""
        with self._sandbox_lock:
            sandbox, self.sandbox = self.sandbox, None
        if sandbox is None:
            return
        self._give_back(sandbox)

    def _give_back(self, sandbox: Any) -> None:
        try:
            if self.pool is not None:
                self.pool.release(sandbox)
            else:
                sandbox.close()
        except Exception:  # closing a dead sandbox is not an error worth surfacing: it is dropped either way
            logger.debug("closing the sandbox failed", exc_info=True)

    # ------------------------------------------------------------------ episode internals

    def _pick_task(self, options: dict[str, Any]) -> Task:
        if isinstance(options.get("task"), Task):
            return options["task"]
        if options.get("task_id") is not None:
            return self.task_set.get(str(options["task_id"]))
        split = options.get("split", self.config.split)
        kinds = tuple(options["kinds"]) if options.get("kinds") else self.config.kinds
        # Draw from the env's seeded generator so reset(seed=s) always gives the same task.
        rng = random.Random(int(self.np_random.integers(0, 2**63 - 1)))
        return self.task_set.sample(split, rng, kinds=kinds)

    def _initial_messages(self, task: Task) -> list[dict[str, Any]]:
        """The messages the episode starts with: the system prompt and the task's user message (an env whose
        tasks are conversations, e.g. BFCL's, starts from the task's own messages instead)."""
        system = self.config.system_prompt or getattr(self.task_set, "system_prompt", None)
        return [
            {"role": "system", "content": system or "You are a helpful assistant."},
            {"role": "user", "content": task.prompt},
        ]

    def _prepare_sandbox(self) -> None:
        if self.backend is None:
            return
        if self.sandbox is not None:
            try:
                self.sandbox.reset()
                return
            except SandboxError:  # dead, or its state cannot be restored: never reuse it
                self._drop_sandbox()
        if self.pool is not None:
            sandbox = self.pool.acquire()
        else:
            sandbox = make_sandbox(self.backend, image=self.image, limits=self.sandbox_limits, **self.sandbox_options)
        self._adopt_sandbox(sandbox)

    def _adopt_sandbox(self, sandbox: Any) -> None:
        """Make a freshly started sandbox the env's, unless close() ran meanwhile: then give it back and fail
        the reset, so that no sandbox outlives its env."""
        with self._sandbox_lock:
            closed = self._closed
            if not closed:
                self.sandbox = sandbox
        if closed:
            self._give_back(sandbox)
            raise RuntimeError("the env was closed while its reset was starting a sandbox; the sandbox is closed")

    def _setup_task(self, task: Task) -> None:
        self.task_set.setup(task, self.sandbox)

    def _close_episode(self) -> None:
        """Close stateful tools (e.g. the python interpreter) of the previous episode, once each."""
        owners = {
            id(getattr(t.fn, "__self__", None)): getattr(t.fn, "__self__", None) for t in self._tools.values()
        }
        for owner in owners.values():
            close = getattr(owner, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # the episode is over either way; a dead sandbox takes its tools along
                    logger.debug("closing a tool of the episode failed", exc_info=True)
        self._tools = {}

    def _act(self, text: str, info: dict[str, Any]) -> tuple[list[str], bool, bool]:
        """`_run_action` behind the step's two guards: the action's size, and a last resort for a bug in
        parsing or validation (logged and shown as an error; the episode goes on)."""
        limit = self.config.max_action_chars
        if len(text) > limit:
            message = (f"Error: your message has {len(text)} characters, more than the {limit} this environment "
                       "accepts, so none of it was read or run. Keep each turn shorter: write large files in "
                       "several calls.")
            info["errors"].append({"kind": "format", "message": message})
            return [message], False, False
        try:
            return self._run_action(text, info)
        except Exception as exc:
            logger.exception("ToolEnv: the action of step %d could not be processed", self._steps)
            message = f"Error: the environment could not process this message ({type(exc).__name__})."
            info["errors"].append({"kind": "tool", "message": message})
            return [message], False, False

    def _run_action(self, text: str, info: dict[str, Any]) -> tuple[list[str], bool, bool]:
        """Parse and execute; returns (responses, terminated, truncated).

        One response per invoke the model wrote, in its order (results match calls by position): the tool's
        output for a valid call, the parser's messages for an invalid one. Errors not tied to an invoke
        (unclosed block, text after the end) come last.
        """
        # The parser validates every call against its tool's schema (closed: a tool takes only the parameters
        # it declares), so the calls it returns are the ones to run, with typed arguments.
        parsed = parse(text, tools=self._call_specs(), enable_thinking=self.config.enable_thinking)
        by_invoke: dict[int, list[str]] = {}
        general: list[str] = []
        for err in parsed.errors:
            kind = err.kind if err.kind in ERROR_KINDS else "format"
            message = clip_middle(clean_text(str(err.message)), 2000)
            info["errors"].append({"kind": kind, "message": message})
            if err.invoke_index is None:
                general.append(message)
            else:
                by_invoke.setdefault(err.invoke_index, []).append(message)
        calls = {call.index: call for call in parsed.tool_calls}
        if not calls and not parsed.errors:
            if self.config.text_reply_is_answer:
                info["answer"] = clean_text(parsed.content.strip())
                return [], True, False
            message = "No tool call found. Use the tools, and call submit when you are done."
            info["errors"].append({"kind": "format", "message": message})
            return [message], False, False
        responses: list[str] = []
        ended = False
        n_invokes = max([*calls, *by_invoke, -1]) + 1
        limit = self.config.max_tool_calls_per_step
        for index in range(min(n_invokes, limit)):
            call = calls.get(index)
            if call is None:
                responses.append(
                    "Error: " + "\n".join(by_invoke.get(index, ["this tool call was not executed"]))
                )
                continue
            name, arguments = str(call.name), dict(call.arguments)
            info["tool_calls"].append({"name": name, "arguments": _deep_copy(arguments)})
            if ended:
                msg = "Error: call skipped; the episode ended with submit."
                info["tool_results"].append(_result(name, False, msg, False, 0.0))
                responses.append(msg)
                continue
            output, stop = self._call_tool(name, arguments, info)
            responses.append(output)
            if "error" in info:  # the sandbox died: truncate now
                return responses, False, True
            ended = ended or stop
        if n_invokes > limit:
            # One reply for all of them keeps the observation bounded however many invokes were written.
            msg = f"Error: the tool calls after the first {limit} were not run; at most {limit} run per turn."
            info["errors"].append({"kind": "tool", "message": msg})
            responses.append(msg)
        if general:
            responses.append("Error: " + "\n".join(general[:5]))
        return responses, ended, False

    def _call_specs(self) -> list[dict[str, Any]]:
        """The specs calls are checked against (`closed_spec` of each tool's; an env whose grader accepts more
        than the prompt's schema, e.g. BFCL's, relaxes them)."""
        return [closed_spec(tool.spec) for tool in self._tools.values()]

    def _call_tool(self, name: str, arguments: dict[str, Any], info: dict[str, Any]) -> tuple[str, bool]:
        """Run one call the parser validated; returns (response text, episode ended). Never raises."""
        tool = self._tools[name]
        t0 = time.perf_counter()
        out: ToolOutput
        try:
            out = tool(**arguments)
        except SandboxDead as exc:
            duration = time.perf_counter() - t0
            info["timings"]["sandbox_s"] += duration
            msg = f"Error: the sandbox died: {exc}"
            info["error"] = msg
            info["errors"].append({"kind": "sandbox", "message": msg})
            info["tool_results"].append(_result(name, False, msg, False, duration))
            return msg, True
        except ToolError as exc:
            out = ToolOutput(output=f"Error: {exc}", ok=False, error=str(exc))
        except Exception as exc:  # a tool bug or a sandbox refusal: show it, never crash the rollout
            msg = f"{name} failed: {type(exc).__name__}: {exc}"
            out = ToolOutput(output=f"Error: {msg}", ok=False, error=msg)
        duration = time.perf_counter() - t0
        info["timings"]["sandbox_s"] += duration
        text = clip_middle(clean_text(out.output), self.config.max_output_chars)
        if out.timed_out:
            info["errors"].append({"kind": "timeout", "message": f"{name} timed out"})
        elif out.error is not None:
            info["errors"].append({"kind": "tool", "message": clip_middle(out.error, 2000)})
        info["tool_results"].append(_result(name, out.ok, text, out.timed_out, duration))
        info["edits"].extend(self._with_syntax(out.edits))
        info["files_viewed"].extend(out.files_viewed)
        info["commands"].extend(out.commands)
        if out.tests is not None:
            tests = info.setdefault("tests", {"passed": [], "failed": []})
            for key in ("passed", "failed"):
                tests[key].extend(t for t in out.tests.get(key, []) if t not in tests[key])
        if out.answer is not None:
            info["answer"] = out.answer
        return text, out.done or out.answer is not None

    def _with_syntax(self, edits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The call's edits, with the syntax of unchecked Python files checked by reading them back (a file
        that cannot be read, e.g. one already deleted, stays unchecked)."""
        out, budget = [], self.config.max_syntax_checks
        for edit in edits:
            edit = dict(edit)
            path = str(edit.get("path", ""))
            if edit.get("syntax_ok") is None and path.endswith(".py") and budget > 0 and self.sandbox is not None:
                budget -= 1
                try:
                    text = self.sandbox.read_file(path, max_bytes=1 << 20).decode("utf-8", "replace")
                    edit["syntax_ok"] = python_syntax_ok(path, text)
                except Exception:  # noqa: BLE001  gone, not a regular file, too large, a dead sandbox: nothing to score
                    logger.debug("could not read back %s for a syntax check", path, exc_info=True)
            out.append(edit)
        return out

    def _grade(self, info: dict[str, Any]) -> None:
        assert self.task is not None
        t0 = time.perf_counter()
        try:
            if self.sandbox is not None:
                # The episode is over: no process of the agent's may still change what the grader reads.
                self.sandbox.kill_processes()
            verdict = self.task_set.grade(self.task, self.sandbox, info.get("answer"))
        except SandboxDead as exc:
            info["error"] = f"the sandbox died while grading: {exc}"
            info["errors"].append({"kind": "sandbox", "message": info["error"]})
            return
        except Exception as exc:  # a grader failure must not be scored as the agent's success
            verdict = Verification(False, 0.0, f"grader failed: {type(exc).__name__}: {exc}")
        info["verification"] = verdict.to_dict()
        info["timings"]["grade_s"] = time.perf_counter() - t0

    def _reward_breakdown(self, info: dict[str, Any]) -> dict[str, float]:
        """This step's weighted components under the env's RewardSpec, computed on the episode so far.

        Rewards are causal for the `dense` shaping mode (a step's value depends only on steps up to it), so
        the incremental value equals the full-episode one; with `potential` shaping the learner should
        recompute rewards on the whole episode's infos (`compute_episode_rewards`).
        """
        assert self.task is not None
        reward_task = self.task_set.reward_task(self.task)
        view = StepInfo.from_dict(_deep_copy(info), len(self._step_views))
        new_hits = run_detectors([view], reward_task, self.reward_spec.detectors, first_step=len(self._step_views))
        self._step_views.append(view)
        self._detector_hits += new_hits
        info["detectors"] = {}
        for hit in new_hits:
            info["detectors"].setdefault(hit.detector, []).append(hit.evidence)
        rewards = compute_episode_rewards(self.reward_spec, self._step_views, reward_task, hits=self._detector_hits)
        return {str(k): float(v) for k, v in rewards.per_step_breakdown[-1].items()}

    def _observation(self, action: str, responses: list[str]) -> str:
        """The text to append after the sampled action: close the turn if sampling was cut before `[e~[`,
        then the tool responses and the next generation prompt (nothing more when the turn had no calls)."""
        prefix = "" if action.rstrip().endswith(EOS) else EOS
        if not responses:
            return prefix
        obs = prefix + render_tool_suffix(responses, enable_thinking=self.config.enable_thinking)
        # `_fit_observation` keeps this within bounds; the cut only guards a limit smaller than the template.
        return obs[: self.config.max_observation_chars]

    def _fit_observation(self, action: str, responses: list[str]) -> list[str]:
        """The responses, middles cut to equal shares when the rendered observation would exceed
        `max_observation_chars` (cutting the rendered suffix instead would break the transcript)."""
        if not responses:
            return responses
        budget = self.config.max_observation_chars - len(self._observation(action, [""] * len(responses)))
        if sum(len(r) for r in responses) <= budget:
            return responses
        share = budget // len(responses) - _CLIP_NOTE_CHARS
        return [clip_middle(r, max(0, share)) for r in responses]


def _result(name: str, ok: bool, output: str, timed_out: bool, duration: float) -> dict[str, Any]:
    return {"name": name, "ok": ok, "output": output, "timed_out": timed_out, "duration_s": duration}


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def make_reward_spec(spec: Any) -> Any:
    """None -> the default `RewardSpec`; a mapping (YAML form) -> `RewardSpec.from_dict`; a spec as is."""
    if spec is None:
        return RewardSpec.default()
    if isinstance(spec, dict):
        return RewardSpec.from_dict(spec)
    if not isinstance(spec, RewardSpec):
        raise TypeError(f"reward_spec must be a RewardSpec, a dict or None, got {type(spec).__name__}")
    return spec
