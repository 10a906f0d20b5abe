"""`m2rl/BFCL-v0`: the Berkeley Function Calling Leaderboard (v4) as a `ToolEnv`, graded by BFCL's own checkers.

    env = gymnasium.make("m2rl/BFCL-v0", category="multi_turn_base", split="test")

`category` (one name or a list; default: every category that runs here, tasks.CATEGORIES) picks the BFCL
categories; `split` and every other `ToolEnvConfig` field work as in every m2rl env. An episode is one BFCL
test entry, played as BFCL's FC harness plays it (`base_handler.inference_multi_turn_FC`):

- The prompt is the entry's first-turn messages, with its function docs as M2 tools (convert.py).
- Single-turn categories: the policy answers once. Its calls are checked by BFCL's AST checker (simple,
  multiple, parallel, parallel_multiple, java, javascript and the live variants); the irrelevance categories
  pass when the reply makes no call, live_relevance when it makes one (a call: an invoke the parser read,
  valid or not; a block that does not parse is BFCL's decode failure, no call). Nothing is executed; the episode ends after that one step.
- Multi-turn categories: each call runs on the episode's own instances of BFCL's backends (file system,
  math, messages, posts, tickets, trading, travel, vehicle), state carrying across steps and turns; its
  result is the tool response. A reply with no call ends the user turn and the next user message is the
  observation; the `miss_func` turns that bring held-out functions add them to the tools and list them in
  that user message (BFCL's prompting-mode text: the system prompt, rendered once, cannot change). More than
  20 steps in one turn is BFCL's force-quit (the entry fails). After the last turn BFCL's `multi_turn_checker`
  replays the executed calls of every step on fresh backends and compares state and responses per turn.

Malformed output (an unknown tool, a missing argument, an unclosed block) is never a crash: the parser's
errors are the observation (multi-turn: the turn goes on) and count as no valid call for the checker.
The verdict is `info["verification"]`: resolved = BFCL's "valid", its error type and message the details.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from m2rl.agent.format import EOS, neutralize_markers, parse, render_user_suffix
from m2rl.envs.bfcl import checker, convert
from m2rl.envs.bfcl.tasks import CATEGORIES, BFCLTaskSet, is_multi_turn
from m2rl.envs.registration import register_env
from m2rl.envs.tasks.base import Task, Verification
from m2rl.envs.tool import Tool, ToolOutput
from m2rl.envs.tool_env import ToolEnv, clean_text
from m2rl.rewards.episode import ERROR_KINDS

MAX_STEPS_PER_TURN = 20  # BFCL's MAXIMUM_STEP_LIMIT: a turn with more steps is force-quit
DEFAULTS = {"max_steps": 200, "max_tool_calls_per_step": 32, "max_observation_chars": 262_144}


class BFCLEnv(ToolEnv):
    """Args: `category` (str or list of BFCL categories; None: all that run here) and `ToolEnv` options."""

    def __init__(self, category: str | list[str] | tuple[str, ...] | None = None, reward_spec: Any = None,
                 render_mode: str | None = None, **overrides: Any) -> None:
        checker.load()  # fail now, with the install command, when bfcl-eval is missing
        # No sandbox: BFCL's backends are in-process simulations (no file, process or network of the host). The
        # trainer passes its env.sandbox to every env; it does not apply here.
        overrides.pop("backend", None)
        if category is not None:
            overrides["kinds"] = (category,) if isinstance(category, str) else tuple(category)
        for kind in overrides.get("kinds") or ():
            if kind not in CATEGORIES:
                BFCLTaskSet().generate(kind, 0)  # raises, naming the categories (and why one is not offered)
        for key, value in DEFAULTS.items():
            overrides.setdefault(key, value)
        self._turn = 0
        self._steps_in_turn = 0
        self._executed: list[list[list[str]]] = []  # [turn][step] -> executable calls run (BFCL's decoded form)
        self._single_calls: list[tuple[str, dict[str, Any]]] | None = None
        self._abstained = True
        self._pending_user: str | None = None
        self._force_quit = False
        self._episode_model = ""
        super().__init__(BFCLTaskSet(), self._episode_tools, backend=None, reward_spec=reward_spec,
                         render_mode=render_mode, **overrides)

    # ------------------------------------------------------------------ episode set-up

    @property
    def entry(self) -> dict[str, Any]:
        assert self.task is not None, "no episode: call reset() first"
        return self.task.meta["entry"]

    @property
    def multi_turn(self) -> bool:
        return self.task is not None and is_multi_turn(self.task.kind)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        options = dict(options or {})
        if options.get("category") is not None:
            category = options.pop("category")
            options["kinds"] = (category,) if isinstance(category, str) else tuple(category)
        self._forget_backends()
        self._turn, self._steps_in_turn, self._executed = 0, 0, [[]]
        self._single_calls, self._abstained, self._pending_user, self._force_quit = None, True, None, False
        self._episode_model = f"{checker.MODEL_NAME}-{uuid.uuid4().hex[:16]}"
        obs, info = super().reset(seed=seed, options=options)
        info["bfcl_id"] = self.entry["id"]
        return obs, info

    def _setup_task(self, task: Task) -> None:
        if is_multi_turn(task.kind):  # the backends start from the entry's initial config, as in BFCL's harness
            checker.execute([], task.meta["entry"], self._episode_model)

    def _episode_tools(self, env: Any) -> list[Tool]:
        return [self._tool(spec) for spec in convert.tool_specs(self.entry["function"])]

    def _tool(self, spec: dict[str, Any]) -> Tool:
        name = spec["function"]["name"]

        def call(**arguments: Any) -> ToolOutput:
            return self._execute(name, arguments)

        return Tool(fn=call, spec=spec)

    def _execute(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        (call,) = convert.executable_form([(name, arguments)])
        (result,) = checker.execute([call], self.entry, self._episode_model)
        self._executed[self._turn][-1].append(call)
        failed = result.startswith("Error during execution")
        return ToolOutput(output=result, ok=not failed, error=result if failed else None)

    def _initial_messages(self, task: Task) -> list[dict[str, Any]]:
        """The entry's first-turn messages (a system message, earlier turns of a live conversation, the user's
        request); a system prompt is added only where the entry has none, as the M2 template does."""
        messages = [dict(m) for m in task.meta["entry"]["question"][0]]
        if not messages or messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": self.config.system_prompt or "You are a helpful assistant."})
        return messages

    # ------------------------------------------------------------------ steps

    def _run_action(self, text: str, info: dict[str, Any]) -> tuple[list[str], bool, bool]:
        if not self.multi_turn:
            return self._answer_once(text, info)
        self._steps_in_turn += 1
        self._executed[self._turn].append([])
        responses, _, _ = super()._run_action(text, info)
        if info["tool_calls"] or info["errors"]:
            info.pop("answer", None)
            if self._steps_in_turn > MAX_STEPS_PER_TURN:
                self._force_quit = True
                return responses, False, True
            return responses, False, False
        # A reply with no call ends the user turn (BFCL: an empty decoded response).
        self._executed[self._turn].pop()
        return self._next_turn(info)

    def _answer_once(self, text: str, info: dict[str, Any]) -> tuple[list[str], bool, bool]:
        """A single-turn entry: parse (nothing runs) and end the episode; malformed invokes are shown."""
        parsed = parse(text, tools=self._call_specs(), enable_thinking=self.config.enable_thinking)
        self._single_calls = [(str(c.name), dict(c.arguments)) for c in parsed.tool_calls]
        # A call is an invoke the parser read, valid or not (an FC API hands BFCL a hallucinated name or bad
        # arguments as a call too); a block that does not parse at all is BFCL's decode failure: no call.
        self._abstained = not parsed.tool_calls and all(e.invoke_index is None for e in parsed.errors)
        for name, arguments in self._single_calls:
            info["tool_calls"].append({"name": name, "arguments": json.loads(json.dumps(arguments))})
        responses = []
        for err in parsed.errors:
            message = clean_text(str(err.message))
            info["errors"].append({"kind": err.kind if err.kind in ERROR_KINDS else "format", "message": message})
            responses.append("Error: " + message)
        if not parsed.tool_calls and not parsed.errors:
            info["answer"] = clean_text(parsed.content.strip())
        return responses, True, False

    def _call_specs(self) -> list[dict[str, Any]]:
        return [convert.grading_spec(tool.spec) for tool in self._tools.values()]

    def _next_turn(self, info: dict[str, Any]) -> tuple[list[str], bool, bool]:
        questions = self.entry["question"]
        if self._turn + 1 >= len(questions):
            return [], True, False
        self._turn += 1
        self._steps_in_turn = 0
        self._executed.append([])
        info.pop("answer", None)
        messages = questions[self._turn]
        held_out = self.entry.get("missed_function", {}).get(str(self._turn))
        if held_out:
            specs = convert.tool_specs(held_out)
            for spec in specs:
                self._tools[spec["function"]["name"]] = self._tool(spec)
            functions = json.dumps([spec["function"] for spec in specs], ensure_ascii=False)
            self._pending_user = checker.load().prompts.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING.format(
                functions=functions)
        else:
            self._pending_user = "\n\n".join(str(m["content"]) for m in messages if m.get("role") == "user")
        return [], False, False

    def _observation(self, action: str, responses: list[str]) -> str:
        if self._pending_user is None or responses:
            return super()._observation(action, responses)
        prefix = "" if action.rstrip().endswith(EOS) else EOS
        user = neutralize_markers(clean_text(self._pending_user), self.config.control_tokens)
        self._pending_user = None
        return prefix + render_user_suffix(user, enable_thinking=self.config.enable_thinking)

    # ------------------------------------------------------------------ grading

    def _grade(self, info: dict[str, Any]) -> None:
        assert self.task is not None
        try:
            verdict = self._verdict()
        except Exception as exc:  # noqa: BLE001  a checker failure must not be scored as the agent's success
            verdict = Verification(False, 0.0, f"grader failed: {type(exc).__name__}: {exc}")
        info["verification"] = verdict.to_dict()

    def _verdict(self) -> Verification:
        assert self.task is not None
        category, answer = self.task.kind, self.task.meta["answer"]
        if self.multi_turn:
            if self._force_quit:
                result: dict[str, Any] = {"valid": False, "error_type": "multi_turn:force_terminated",
                                          "error_message": f"more than {MAX_STEPS_PER_TURN} steps in turn {self._turn}"}
            else:
                decoded = [[step for step in turn if step] for turn in self._executed]
                result = checker.check_multi_turn(self.entry, answer["ground_truth"], decoded, self._episode_model)
        else:
            result = checker.check_single_turn(self.task.meta["checked_functions"], answer, category, convert.ast_form(self._single_calls or []),
                                               self._abstained)
        if result.get("valid"):
            return Verification(True, 1.0, f"BFCL {category}: valid")
        error = result.get("error") or result.get("error_message") or ""
        if isinstance(error, list):
            error = "; ".join(str(e) for e in error)
        return Verification(False, 0.0, f"BFCL {category}: {result.get('error_type', 'invalid')}: {str(error)[:500]}")

    def _forget_backends(self) -> None:
        if self._episode_model:
            checker.drop_instances(self._episode_model)

    def close(self) -> None:
        self._forget_backends()
        super().close()


register_env("m2rl/BFCL-v0", "m2rl.envs.bfcl.env:BFCLEnv")
