"""ToolEnv's `info` is the dict form of a `StepInfo` (rewards/episode.py), on every path out of `step()`."""

from __future__ import annotations

from m2rl.agent.format import render_completion
from m2rl.envs import Task, TaskSet, ToolEnv, ToolOutput
from m2rl.rewards.episode import StepInfo


class SumTasks(TaskSet):
    family, kinds = "sum", ("three",)

    def generate(self, kind: str, seed: int) -> Task:
        return self.make_task(kind, seed, "What is 2 + 3 + 4? Submit the number.", answer="9")


def shell(command: str) -> ToolOutput:
    """Pretend to run a command.

    Args:
        command: the command
    """
    return ToolOutput(output=command, commands=[command], edits=[{"path": "out.txt", "syntax_ok": None}])


def submit(answer: str) -> ToolOutput:
    """Submit the final answer.

    Args:
        answer: the answer
    """
    return ToolOutput(output="Submitted.", answer=answer, done=True)


def call(name: str, **args: str) -> str:
    tool_call = {"type": "function", "function": {"name": name, "arguments": args}}
    return render_completion({"role": "assistant", "reasoning_content": "Go.", "content": "", "tool_calls": [tool_call]})


def test_every_step_info_is_a_step_infos_dict_form() -> None:
    """Before: ToolEnv built its info as a free dict (`empty_info` listed its own keys; the episode-over path
    had no `responses`), so nothing held it to the contract the readers parse."""
    env = ToolEnv(SumTasks(), lambda _env: [shell, submit], backend=None)
    env.reset(seed=0)
    infos = [env.step(call("shell", command="echo 9 > out.txt"))[-1], env.step(call("submit", answer="9"))[-1]]
    infos.append(env.step(call("submit", answer="9"))[-1])  # the episode is over
    for info in infos:
        assert StepInfo.from_dict(info).to_dict() == info
    first, last, over = (StepInfo.from_dict(info) for info in infos)
    assert first.commands == ("echo 9 > out.txt",) and first.edits[0].path == "out.txt"
    assert first.responses == ("echo 9 > out.txt",) and first.reward == sum(first.reward_breakdown.values())
    assert last.answer == "9" and last.verification is not None and last.verification.resolved
    assert over.errors[0].kind == "format" and over.reward_breakdown == {} and over.responses == ()
    env.close()
