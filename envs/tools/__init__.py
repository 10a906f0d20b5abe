"""Tools the envs hand to the policy: bash, python (persistent interpreter), str_replace_editor, submit."""

from m2rl.envs.tools.bash import BashTool
from m2rl.envs.tools.editor import EditorTool
from m2rl.envs.tools.python import PythonTool
from m2rl.envs.tools.submit import submit

__all__ = ["BashTool", "EditorTool", "PythonTool", "submit"]
