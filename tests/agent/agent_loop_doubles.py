"""Test doubles for the agent-loop and policy tests (imported by path; pytest runs with importlib mode).

- `CalculatorEnv`: a Gymnasium env double with two tools (`add`, `submit`) that parses the policy's text
  with the real M2 parser and replies with the real rendered tool suffix, like `m2rl.envs.ToolEnv`.
- `canonical_episode_texts()`: what a well-behaved M2 model writes to solve the env's task, produced by
  the renderer (`render_completion`), so every segment is canonical text.
- `memorized_model()`: a tiny M2 model (softmax routing, no routing bias, so vLLM-CPU can serve it)
  trained on CPU until greedy decoding reproduces that canonical episode token for token. It is how the
  acceptance test gets a real model whose samples are what the tokenizer produces, without weakening
  the continuity check.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import torch
from m2rl.agent.format import parse, render, render_completion, render_ids, render_tool_suffix
from m2rl.envs import Task, TaskSet, ToolOutput
from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer

EOS = "[e~["

ADD_SPEC = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
SUBMIT_SPEC = {"type": "function", "function": {
    "name": "submit", "description": "Submit the final answer.",
    "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}


class CalculatorEnv(gym.Env):
    """Task: compute 2 + 3 + 4 with the `add` tool and `submit` the result (reward 1 if right)."""

    metadata = {"render_modes": []}

    def __init__(self, question: str = "What is 2 + 3 + 4? Use the add tool, then submit.",
                 answer: str = "9", max_steps: int = 8) -> None:
        self.question, self.answer, self.max_steps = question, answer, max_steps
        self.observation_space = gym.spaces.Text(100_000)
        self.action_space = gym.spaces.Text(100_000)
        self.steps = 0
        self.actions: list[str] = []

    def prompt_messages(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": "You are a careful calculator agent."},
                {"role": "user", "content": self.question}]

    def tools_spec(self) -> list[dict[str, Any]]:
        return [ADD_SPEC, SUBMIT_SPEC]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        self.steps, self.actions = 0, []
        obs = render(self.prompt_messages(), self.tools_spec(), add_generation_prompt=True)
        return obs, {"task_id": "calc/0"}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        self.steps += 1
        self.actions.append(action)
        parsed = parse(action, self.tools_spec(), enable_thinking=True)
        info: dict[str, Any] = {"errors": [e.to_dict() for e in parsed.errors], "tool_results": []}
        responses: list[str] = []
        terminated, reward = False, 0.0
        for call in parsed.tool_calls:
            if call.name == "add":
                out = str(call.arguments["a"] + call.arguments["b"])
            else:
                terminated = True
                reward = float(str(call.arguments["answer"]).strip() == self.answer)
                out = "Submitted."
            responses.append(out)
            info["tool_results"].append({"name": call.name, "ok": True, "output": out})
        responses += [f"Error: {e.message}" for e in parsed.errors]
        if not responses:  # a plain text reply is the final answer
            terminated = True
            reward = float(parsed.content.strip() == self.answer)
        truncated = not terminated and self.steps >= self.max_steps
        info["responses"] = responses
        prefix = "" if action.rstrip().endswith(EOS) else EOS  # close a length-cut turn, as ToolEnv does
        obs = prefix + (render_tool_suffix(responses) if responses else "")
        return obs, reward, terminated, truncated, info


def canonical_messages() -> list[dict[str, Any]]:
    """The assistant turns (with the tool replies between them) that solve CalculatorEnv's task."""
    def call(name: str, **args: Any) -> dict[str, Any]:
        return {"type": "function", "function": {"name": name, "arguments": args}}

    return [
        {"role": "assistant", "reasoning_content": "First add 2 and 3.", "content": "",
         "tool_calls": [call("add", a=2, b=3)]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "reasoning_content": "Now add 4 to 5.", "content": "",
         "tool_calls": [call("add", a=5, b=4)]},
        {"role": "tool", "content": "9"},
        {"role": "assistant", "reasoning_content": "The sum is 9.", "content": "Done.",
         "tool_calls": [call("submit", answer="9")]},
    ]


def canonical_episode_texts() -> list[str]:
    return [render_completion(m) for m in canonical_messages() if m["role"] == "assistant"]


TRAIN_STEPS: dict[tuple[int, float], int] = {}  # steps each memorization took (for the report)


def tiny_config() -> M2Config:
    # softmax routing and no routing bias: the variant vLLM's CPU MoE can serve (see machine.md).
    cfg = M2Config.from_preset("tiny")
    cfg.scoring_func, cfg.use_routing_bias = "softmax", False
    cfg.validate()
    return cfg


@functools.cache
def memorized_model(seed: int = 0, max_steps: int = 400, lr: float = 3e-3) -> tuple[M2ForCausalLM, list[int], list[int]]:
    """Train a tiny M2 until greedy decoding reproduces the canonical episode.

    Returns (model in eval mode, transcript ids, loss mask of the sampled tokens). Trained on the sampled
    tokens only; stops once every sampled token is the argmax with probability > 0.9, so greedy decoding
    (KV-cache path, slightly different float order) cannot flip a choice.
    """
    torch.manual_seed(seed)
    tok = M2Tokenizer.tiny()
    env = CalculatorEnv()
    # Built the way the loop builds it: prompt, then each completion (sampled) and each tool suffix.
    ids = render_ids(tok, env.prompt_messages(), env.tools_spec(), add_generation_prompt=True)
    mask = [0] * len(ids)
    for m in canonical_messages():
        if m["role"] == "assistant":
            seg, flag = tok.encode(render_completion(m)), 1
        else:
            seg, flag = tok.encode(render_tool_suffix([m["content"]])), 0
        ids, mask = ids + seg, mask + [flag] * len(seg)
    model = M2ForCausalLM(tiny_config()).init_weights(seed=seed)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor(ids[1:])
    m = torch.tensor(mask[1:], dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(max_steps):
        logits = model(x)[0]
        lp = torch.log_softmax(logits.float(), -1)
        target_lp = lp[torch.arange(len(y)), y][m]
        if bool((target_lp > -0.1).all()):  # p > 0.9 on every sampled token
            break
        loss = -target_lp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise RuntimeError(f"memorization did not converge in {max_steps} steps (min p "
                           f"{float(target_lp.exp().min()):.3f})")
    model.eval()
    TRAIN_STEPS[(seed, lr)] = step
    return model, ids, mask


# A ToolEnv task set and its tools: one sum, an add tool and a submit tool (the loop and chat-adapter tests).
class SumTasks(TaskSet):
    family, kinds = "sum", ("three",)

    def generate(self, kind: str, seed: int) -> Task:
        return Task(id=self.task_id(kind, seed), family=self.family, kind=kind, seed=seed, split="train",
                    prompt="What is 2 + 3 + 4? Use the add tool, then submit.", answer="9")


def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: first addend
        b: second addend
    """
    return str(a + b)


def submit(answer: str) -> ToolOutput:
    """Submit the final answer.

    Args:
        answer: the answer
    """
    return ToolOutput(output="Submitted.", answer=answer)
