"""Example env: repair a broken JSON config with the editor and bash; a checker grades the final file."""

import json
import random

from m2rl.envs import Task, TaskSet, ToolEnv, register_env
from m2rl.envs.experts import Script
from m2rl.envs.tasks.base import checker_script
from m2rl.envs.tools import BashTool, EditorTool, submit

KEYS = ("port", "workers", "retries", "timeout", "cache_mb", "log_level", "batch", "shards")

# Runs in the sandbox after the episode; EXPECTED is baked in by checker_script, so the agent never sees it.
CHECK = """
def check(expected):
    got = json.load(open("/work/config.json"))  # a parse error fails the task (checker_script catches it)
    return got == expected, "correct" if got == expected else f"config.json holds {got}"
"""


class JsonFixerTasks(TaskSet):
    family = "json_fixer"
    kinds = ("fix",)

    def generate(self, kind: str, seed: int) -> Task:
        rng = random.Random(seed)
        *keys, key = rng.sample(KEYS, 5)
        config = {k: rng.randint(1, 99) for k in keys}
        value = rng.randint(100, 999)
        broken = json.dumps(config, indent=2).replace("\n}", ",\n}")  # a trailing comma: not JSON
        prompt = (f'/work/config.json does not parse. Fix it and add the key "{key}" with the value {value}, '
                  "keeping the other keys. Then submit 'done'.")
        return self.make_task(kind, seed, prompt, files={"/work/config.json": broken},
                              checker=checker_script(CHECK, {**config, key: value}),
                              meta={"key": key, "value": value})


def json_fixer_tools(env: ToolEnv) -> list:
    return [BashTool(env.sandbox, env.config.tool_timeout_s).bash, EditorTool(env.sandbox).str_replace_editor,
            submit]


def make_json_fixer_env(**kwargs) -> ToolEnv:
    return ToolEnv(JsonFixerTasks(), json_fixer_tools, **kwargs)


def json_fixer_expert(task: Task) -> Script:
    """Scripted expert: view the file, replace the trailing comma by the missing key, check, submit."""
    edit = {"command": "str_replace", "path": "/work/config.json", "old_str": ",\n}",
            "new_str": f',\n  "{task.meta["key"]}": {task.meta["value"]}\n}}'}
    yield [("str_replace_editor", {"command": "view", "path": "/work/config.json"})]
    yield [("str_replace_editor", edit)]
    outputs = yield [("bash", {"command": "python3 -m json.tool /work/config.json && echo parses"})]
    yield [("submit", {"answer": "done" if "parses" in outputs[0] else "it still does not parse"})]


register_env("m2rl/JsonFixer-v0", "m2rl.envs.examples.json_fixer:make_json_fixer_env")
