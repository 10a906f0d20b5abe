"""TRL's GRPOTrainer as a peer of our learner, on the single-turn variant of m2rl/Python-v0's arith tasks.

Single-turn variant: the prompt is the env's rendered first prompt (system with tools + user task +
generation prompt, exactly what `ToolEnv.reset` shows the policy); the completion is the first assistant
turn. Reward 1 if that turn parses cleanly (m2rl.agent.format.parse) and its first tool call is `python`
whose code is `print(<integer arithmetic>)` printing the task's answer, else 0. The code is never run:
it is parsed with `ast` and evaluated only if it is integer literals combined with + - * and parentheses,
which is all the arith family needs (a solution in any other form scores 0 here, though the multi-turn
env could accept it; the multi-turn held-out eval is the number the comparison reports first).

TRL decodes completions with `skip_special_tokens=True`, which deletes the M2 markers
(`<minimax:tool_call>`, `[e~[`, ...), so the reward decodes `completion_ids` with our tokenizer instead.

`run_trl` trains with TRL on CPU with our optimizer settings and evaluates the policy every `eval_every`
optimizer steps by saving it in Hugging Face format, loading it back with `m2rl.model.load_pretrained`
and running a multi-turn held-out evaluation (the same `Trainer.evaluate()` our runs use).
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from m2rl.agent.format import parse

ARITH_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
}
MAX_LITERAL_DIGITS = 30  # the arith family uses 2-digit operands; this bounds the work of a silly output


# ------------------------------------------------------------------------------------------ pure pieces


def arith_value(source: str) -> int | None:
    """The value of an integer expression of literals, + - * and parentheses (unary minus allowed), or None
    when `source` is anything else. Safe: nothing is executed."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value if len(str(node.value)) <= MAX_LITERAL_DIGITS else None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
        if isinstance(node, ast.BinOp) and type(node.op) in ARITH_OPS:
            left, right = value(node.left), value(node.right)
            return None if left is None or right is None else ARITH_OPS[type(node.op)](left, right)
        return None

    return value(tree.body)


def printed_value(code: str) -> int | None:
    """The integer `code` prints if it is exactly one `print(<arith expression>)` statement, else None."""
    try:
        tree = ast.parse(code.strip(), mode="exec")
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    call = tree.body[0].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"
            and len(call.args) == 1 and not call.keywords):
        return None
    return arith_value(ast.unparse(call.args[0]))


def single_turn_reward(completion: str, answer: str | int, tools: list[dict[str, Any]] | None = None,
                       enable_thinking: bool = True) -> float:
    """1.0 if the first assistant turn `completion` (text after the generation prompt, markers kept) is a
    well-formed message whose first tool call is `python` printing `answer`; 0.0 otherwise."""
    try:
        expected = int(str(answer).strip())
    except ValueError:
        raise ValueError(f"single_turn_reward needs an integer answer, got {answer!r}") from None
    parsed = parse(completion, tools, enable_thinking=enable_thinking)
    if parsed.errors or not parsed.tool_calls:
        return 0.0
    call = parsed.tool_calls[0]
    code = call.arguments.get("code")
    if call.name != "python" or not isinstance(code, str):
        return 0.0
    return 1.0 if printed_value(code) == expected else 0.0


# ------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class SingleTurnTask:
    task_id: str
    prompt: str  # the env's rendered first prompt, ending in the generation prompt
    answer: str
    expr: str


def single_turn_tasks(env_id: str, split: str, count: int, kinds: list[str] | None,
                      enable_thinking: bool = True) -> tuple[list[SingleTurnTask], list[dict[str, Any]]]:
    """The first `count` tasks of `split` (the same ids `Trainer` draws: `TaskSet.tasks`) rendered by the
    env itself (no sandbox needed to render), and the env's tool specs."""
    import gymnasium
    import m2rl.envs  # noqa: F401  (registers the m2rl/* ids)

    kwargs: dict[str, Any] = {"backend": None, "split": split, "enable_thinking": enable_thinking}
    if kinds:
        kwargs["kinds"] = tuple(kinds)
    env = gymnasium.make(env_id, **kwargs)
    base: Any = env.unwrapped  # the ToolEnv
    try:
        task_set = base.task_set
        tasks = task_set.tasks(split, count, kinds=tuple(kinds) if kinds else None)
        out: list[SingleTurnTask] = []
        tools: list[dict[str, Any]] = []
        for task in tasks:
            if "expr" not in task.meta:
                raise ValueError(f"task {task.id} is not an arith task; the single-turn variant needs kinds=[arith]")
            prompt, _ = env.reset(options={"task_id": task.id})
            tools = base.tools_spec()
            out.append(SingleTurnTask(task.id, prompt, str(task.answer), task.meta["expr"]))
        return out, tools
    finally:
        env.close()


class SingleTurnReward:
    """A TRL reward function: decodes `completion_ids` with our tokenizer (markers kept) and scores them."""

    __name__ = "single_turn_python"  # TRL logs rewards under the function's name

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]], enable_thinking: bool = True) -> None:
        self.tokenizer = tokenizer
        self.tools = tools
        self.enable_thinking = enable_thinking

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 answer: list[str], **_: Any) -> list[float]:
        return [single_turn_reward(self.tokenizer.decode(list(ids)), a, self.tools, self.enable_thinking)
                for ids, a in zip(completion_ids, answer, strict=True)]


@torch.no_grad()
def single_turn_success(model: torch.nn.Module, tokenizer: Any, tasks: list[SingleTurnTask],
                        tools: list[dict[str, Any]], max_new_tokens: int, batch_size: int = 16,
                        enable_thinking: bool = True) -> float:
    """Greedy single-turn success of an `M2ForCausalLM` on `tasks` (our generator, for every row alike)."""
    from m2rl.model.generation import SamplingParams, generate

    if not tasks:
        raise ValueError("single_turn_success needs at least one task")
    params = SamplingParams(max_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,), greedy=True)
    was_training = model.training
    model.eval()
    solved = 0.0
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        outputs = generate(model, [tokenizer.encode(t.prompt) for t in chunk], params)
        solved += sum(single_turn_reward(tokenizer.decode(o.ids), t.answer, tools, enable_thinking)
                      for o, t in zip(outputs, chunk, strict=True))
    model.train(was_training)
    return solved / len(tasks)


# ------------------------------------------------------------------------------------------ TRL run


@dataclass
class TRLSettings:
    """What a TRL run shares with ours. `epsilon_high` is TRL's ABSOLUTE cap for cispo (1 + our eps_high)."""

    loss_type: str  # "cispo" | "grpo"
    seed: int
    steps: int  # optimizer steps
    prompts_per_step: int
    group_size: int  # num_generations
    lr: float
    max_new_tokens: int
    temperature: float
    epsilon: float
    epsilon_high: float
    max_grad_norm: float
    betas: tuple[float, float]
    adam_eps: float
    weight_decay: float
    threads: int


def grpo_config(settings: TRLSettings, output_dir: Path) -> Any:
    """TRL's GRPOConfig with our optimizer and sampling settings, one generation batch per optimizer step."""
    from trl import GRPOConfig

    s = settings
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=s.seed, data_seed=s.seed, dataloader_num_workers=0, remove_unused_columns=False,
        max_steps=s.steps,
        # one generation batch (prompts_per_step x G) per optimizer step, one pass: on-policy like ours
        per_device_train_batch_size=s.prompts_per_step * s.group_size, gradient_accumulation_steps=1,
        num_generations=s.group_size, num_iterations=1,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=1.0,
        learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=s.betas[0], adam_beta2=s.betas[1], adam_epsilon=s.adam_eps, weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        loss_type=s.loss_type, epsilon=s.epsilon, epsilon_high=s.epsilon_high,
        beta=0.0, scale_rewards="group", router_aux_loss_coef=0.0,
    )


def make_eval_callback(evaluate: Callable[[int, Any], None], every: int) -> Any:
    """A TrainerCallback calling `evaluate(step, hf_model)` at the start, every `every` steps and at the end."""
    from transformers import TrainerCallback

    class HeldOutEval(TrainerCallback):
        def __init__(self) -> None:
            self.done: set[int] = set()

        def _run(self, step: int, model: Any) -> None:
            if step not in self.done:
                self.done.add(step)
                evaluate(step, model)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self._run(0, model)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if (every and state.global_step % every == 0) or state.global_step >= state.max_steps:
                self._run(state.global_step, model)

    return HeldOutEval()


def hf_to_m2(hf_model: Any, directory: Path) -> Any:
    """Save a transformers model in HF format and load it back as our `M2ForCausalLM` (checks interop)."""
    from m2rl.model import load_pretrained

    hf_model.save_pretrained(str(directory), safe_serialization=True)
    return load_pretrained(directory, dtype=torch.float32, device="cpu")


def run_trl(settings: TRLSettings, init: Path, train_tasks: list[SingleTurnTask], tools: list[dict[str, Any]],
            tokenizer: Any, work_dir: Path, evaluate: Callable[[int, torch.nn.Module], None],
            eval_every: int) -> dict[str, Any]:
    """Train `init` with TRL's GRPOTrainer; `evaluate(step, m2_model)` is called on our-format copies of the
    policy at step 0, every `eval_every` steps and at the end. Returns the final M2 model and TRL's log."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" at every eval

    torch.set_num_threads(max(1, settings.threads))
    if not (init / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{init} has no Hugging Face tokenizer files, which TRL needs; write them with "
                                "m2rl.model.save_pretrained(model, path, tokenizer=M2Tokenizer...)")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(init))
    probe = train_tasks[0].prompt
    if hf_tokenizer(text=[probe])["input_ids"][0] != tokenizer.encode(probe):
        raise RuntimeError(f"the Hugging Face tokenizer in {init} does not encode the prompt like M2Tokenizer; "
                           "TRL would train on different token ids")
    model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": t.prompt, "answer": t.answer, "task_id": t.task_id}
                                 for t in train_tasks])
    final: dict[str, Any] = {}

    def on_eval(step: int, hf_model: Any) -> None:
        m2 = hf_to_m2(hf_model, work_dir / "hf_eval")
        evaluate(step, m2)
        final["model"] = m2

    trainer = GRPOTrainer(
        # a callable returning list[float]; TRL's annotation asks for list[float | None]
        model=model, reward_funcs=[cast(Any, SingleTurnReward(tokenizer, tools))],
        args=grpo_config(settings, work_dir / "trl"),
        train_dataset=dataset, processing_class=hf_tokenizer,
        callbacks=[make_eval_callback(on_eval, eval_every)],
    )
    trainer.remove_callback(PrinterCallback)  # TRL's per-step dicts stay in log_history, off the terminal
    start = time.perf_counter()
    trainer.train()
    return {"model": final["model"], "log": list(trainer.state.log_history),
            "train_s": time.perf_counter() - start, "optimizer_steps": int(trainer.state.global_step)}
