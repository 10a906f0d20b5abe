"""`submit`: the agent's final answer; it ends the episode and the env grades it."""

from __future__ import annotations

from m2rl.envs.tool import ToolOutput


def submit(answer: str) -> ToolOutput:
    """Submit your final answer and end the episode. Call it once, when you are done.

    Args:
        answer: The final answer exactly as asked (e.g. just the number), or "done" for tasks graded on files.
    """
    return ToolOutput(output="Answer submitted.", answer=answer, done=True)
