"""Example env: count the words of a generated file with bash, then submit the number."""

import random

from m2rl.envs import Task, TaskSet, ToolEnv
from m2rl.envs.tools import BashTool, submit

WORDS = ("apple", "river", "stone", "cloud", "maple", "orbit", "pixel", "ember")


class WordCountTasks(TaskSet):
    family = "word_count"
    kinds = ("count",)

    def generate(self, kind: str, seed: int) -> Task:
        rng = random.Random(seed)
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
        prompt = "How many words are in /work/text.txt? Submit just the number."
        files = {"/work/text.txt": " ".join(words) + "\n"}
        return self.make_task(kind, seed, prompt, answer=str(len(words)), files=files)


def word_count_tools(env: ToolEnv) -> list:
    return [BashTool(env.sandbox, env.config.tool_timeout_s).bash, submit]


def make_word_count_env(**kwargs) -> ToolEnv:
    return ToolEnv(WordCountTasks(), word_count_tools, **kwargs)
