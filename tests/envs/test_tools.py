"""The tools against a real bubblewrap sandbox: bash, the persistent python interpreter, the editor."""

from __future__ import annotations

import pytest
from m2rl.envs.tool import ToolError, tool_spec
from m2rl.envs.tools import BashTool, EditorTool, PythonTool, submit

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def module_sandbox():
    from m2rl.sandboxes import make_sandbox

    sandbox = make_sandbox("bwrap")
    yield sandbox
    sandbox.close()


@pytest.fixture
def sandbox(module_sandbox):
    module_sandbox.reset()
    return module_sandbox


# ----------------------------------------------------------------------------- bash


def test_bash_output_exit_code_and_edits(sandbox) -> None:
    bash = BashTool(sandbox, timeout_s=5).bash
    out = bash("echo hello; echo oops >&2; printf 'a\\nb\\n' > /work/f.txt; exit 3")
    assert out.output == "hello\noops\n\n[exit code 3]"
    assert not out.ok and not out.timed_out and out.error is None
    assert out.edits == [{"path": "/work/f.txt", "syntax_ok": None}]
    assert out.commands == ["echo hello; echo oops >&2; printf 'a\\nb\\n' > /work/f.txt; exit 3"]
    assert bash("wc -l < f.txt").output == "2\n"  # cwd is /work, files persist between calls
    assert bash("true").output == "[no output]"


def test_bash_timeout_kills_and_reports(sandbox) -> None:
    out = BashTool(sandbox, timeout_s=1).bash("echo start; sleep 30")
    assert out.timed_out and "start" in out.output and "timed out after 1 s" in out.output


def test_bash_rejects_empty_command(sandbox) -> None:
    with pytest.raises(ToolError, match="empty"):
        BashTool(sandbox).bash("   ")


# ----------------------------------------------------------------------------- python


def test_python_state_persists_and_last_expression_prints(sandbox) -> None:
    tool = PythonTool(sandbox, timeout_s=5)
    try:
        assert tool.python("x = 21\ndef double(v):\n    return 2 * v\n").output == "[no output]"
        out = tool.python("print('value:')\ndouble(x)")
        assert out.output == "value:\n42\n" and out.ok
        assert tool.python("import os\nos.system('echo from-child')").output == "from-child\n0\n"
        out = tool.python("open('/work/made.py', 'w').write('print(1)\\n')")
        assert out.edits == [{"path": "/work/made.py", "syntax_ok": None}]
    finally:
        tool.close()


def test_python_errors_show_a_short_traceback(sandbox) -> None:
    tool = PythonTool(sandbox, timeout_s=5)
    try:
        out = tool.python("def f():\n    return 1 / 0\nf()")
        assert not out.ok
        assert "ZeroDivisionError: division by zero" in out.output
        assert 'File "<cell-1>", line 3' in out.output and "return 1 / 0" in out.output
        assert "repl_server" not in out.output  # the server's own frames are hidden
        assert "SyntaxError" in tool.python("def (:").output
        assert "SystemExit" in tool.python("raise SystemExit(3)").output
        assert tool.python("1 + 1").output == "2\n"  # the interpreter survived all of it
    finally:
        tool.close()


def test_python_timeout_interrupts_the_cell_not_the_interpreter(sandbox) -> None:
    tool = PythonTool(sandbox, timeout_s=1, interrupt_grace_s=2)
    try:
        tool.python("counter = 0")
        out = tool.python("import time\nwhile True:\n    counter += 1\n    time.sleep(0.01)")
        assert out.timed_out and not out.ok
        assert "KeyboardInterrupt" in out.output and "cell interrupted after the 1 s time limit" in out.output
        after = tool.python("counter > 0")
        assert after.output == "True\n" and not after.timed_out
    finally:
        tool.close()


def test_python_cell_ignoring_interrupt_gets_a_fresh_interpreter(sandbox) -> None:
    tool = PythonTool(sandbox, timeout_s=1, interrupt_grace_s=1)
    try:
        tool.python("kept = 1")
        out = tool.python("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)")
        assert out.timed_out and "interpreter was killed" in out.output
        out = tool.python("print('kept' in globals())")
        assert out.output == "False\n"  # a fresh interpreter, said so in the previous reply
    finally:
        tool.close()


def test_python_interpreter_exit_is_reported_and_restarted(sandbox) -> None:
    tool = PythonTool(sandbox, timeout_s=5)
    try:
        tool.python("a = 1")
        out = tool.python("import os\nos._exit(0)")
        assert "exited" in out.output
        out = tool.python("print('a' in globals())")
        assert out.output == "False\n"
    finally:
        tool.close()


# ----------------------------------------------------------------------------- editor


def test_editor_create_view_replace_insert_undo(sandbox) -> None:
    ed = EditorTool(sandbox).str_replace_editor
    out = ed("create", "/work/a.py", file_text="def f():\n    return 1\n")
    assert out.output == "File created successfully at: /work/a.py"
    assert out.edits == [{"path": "/work/a.py", "syntax_ok": True}]
    view = ed("view", "/work/a.py")
    assert view.output == (
        "Here's the result of running `cat -n` on /work/a.py:\n"
        "     1\tdef f():\n     2\t    return 1\n     3\t\n"
    )
    assert view.files_viewed == ["/work/a.py"]
    out = ed("str_replace", "/work/a.py", old_str="return 1", new_str="return (")
    assert out.output.startswith(
        "The file /work/a.py has been edited. Here's the result of running `cat -n` on a "
        "snippet of /work/a.py:\n     1\tdef f():\n     2\t    return (\n"
    )
    assert out.edits == [{"path": "/work/a.py", "syntax_ok": False}]
    out = ed("insert", "/work/a.py", insert_line=0, new_str="# top")
    assert sandbox.read_file("/work/a.py") == b"# top\ndef f():\n    return (\n"
    assert "Review the changes and make sure they are as expected (correct indentation" in out.output
    ed("undo_edit", "/work/a.py")
    assert sandbox.read_file("/work/a.py") == b"def f():\n    return (\n"
    ed("undo_edit", "/work/a.py")
    assert sandbox.read_file("/work/a.py") == b"def f():\n    return 1\n"
    assert ed("view", "/work/a.py", view_range=[2, -1]).output.endswith("     2\t    return 1\n     3\t\n")
    listing = ed("view", "/work").output
    assert listing.startswith(
        "Here's the files and directories up to 2 levels deep in /work, excluding hidden items:"
    )
    assert "/work/a.py" in listing


@pytest.mark.parametrize(
    "call, message",
    [
        (
            dict(command="view", path="work/a.py"),
            "The path work/a.py is not an absolute path, it should start with `/`. Maybe you meant /work/work/a.py?",
        ),
        (
            dict(command="view", path="/work/missing.py"),
            "The path /work/missing.py does not exist. Please provide a valid path.",
        ),
        (
            dict(command="create", path="/work/t.txt", file_text="x"),
            "File already exists at: /work/t.txt. Cannot overwrite files using command `create`.",
        ),
        (
            dict(command="str_replace", path="/work/t.txt", old_str="zzz", new_str="y"),
            "No replacement was performed, old_str `zzz` did not appear verbatim in /work/t.txt.",
        ),
        (
            dict(command="str_replace", path="/work/t.txt", old_str="dup", new_str="y"),
            "No replacement was performed. Multiple occurrences of old_str `dup` in lines [1, 3]. Please ensure it is unique",
        ),
        (
            dict(command="insert", path="/work/t.txt", insert_line=9, new_str="y"),
            "Invalid `insert_line` parameter: 9. It should be within the range of lines of the file: [0, 4]",
        ),
        (
            dict(command="view", path="/work/t.txt", view_range=[0, 2]),
            "Invalid `view_range`: [0, 2]. Its first element `0` should be within the range of lines of the file: [1, 4]",
        ),
        (
            dict(command="view", path="/work/t.txt", view_range=[3, 2]),
            "Invalid `view_range`: [3, 2]. Its second element `2` should be larger or equal than its first `3`",
        ),
        (
            dict(command="view", path="/work/t.txt", view_range=[1, 9]),
            "Invalid `view_range`: [1, 9]. Its second element `9` should be smaller than the number of lines in the file: `4`",
        ),
        (dict(command="undo_edit", path="/work/t.txt"), "No edit history found for /work/t.txt."),
        (
            dict(command="str_replace", path="/work", old_str="a"),
            "The path /work is a directory and only the `view` command can be used on directories",
        ),
        (
            dict(command="create", path="/work/new.txt"),
            "Parameter `file_text` is required for command: create",
        ),
    ],
)
def test_editor_errors_mirror_the_reference_tool(sandbox, call: dict, message: str) -> None:
    sandbox.write_file("/work/t.txt", b"dup\nx\ndup\n")
    with pytest.raises(ToolError) as err:
        EditorTool(sandbox).str_replace_editor(**call)
    assert str(err.value) == message


def test_tool_specs_are_stable() -> None:
    spec = tool_spec(EditorTool(None).str_replace_editor)["function"]
    assert spec["name"] == "str_replace_editor"
    assert spec["parameters"]["required"] == ["command", "path"]
    assert spec["parameters"]["properties"]["command"]["enum"] == [
        "view",
        "create",
        "str_replace",
        "insert",
        "undo_edit",
    ]
    assert spec["parameters"]["properties"]["view_range"] == {
        "type": "array",
        "items": {"type": "integer"},
        "description": "Optional for `view` of a file: [start, end] line numbers (1-based, end -1 = to the end).",
    }
    assert tool_spec(PythonTool(None).python)["function"]["parameters"]["required"] == ["code"]
    assert tool_spec(BashTool(None).bash)["function"]["parameters"]["required"] == ["command"]
    assert submit("7").answer == "7" and submit("7").done


def test_python_output_flood_is_bounded_and_cleaned_up(sandbox) -> None:
    tool = PythonTool(sandbox, timeout_s=5)
    try:
        out = tool.python("print('x' * 1_000_000)")
        assert out.output.endswith("[output truncated]") and len(out.output) < 300_000
        leftovers = sandbox.exec(f"ls {tool.directory}").stdout.split()
        assert sorted(leftovers) == ["client.py", "pid", "server.py"]
    finally:
        tool.close()


@pytest.mark.parametrize("spoil", ["fifo", "symlink-dev-zero"])
def test_python_cell_spoiling_its_own_files_does_not_wedge_the_tool(sandbox, spoil: str) -> None:
    """A cell that swaps its output and result files for a FIFO or a /dev/zero link: the call returns
    promptly (the tool's client never follows a link or waits on a FIFO) and the next cell runs."""
    import time

    make = "os.mkfifo(p)" if spoil == "fifo" else "os.symlink('/dev/zero', p)"
    cell = (
        "import os, glob\n"
        "d = [p for p in glob.glob('/tmp/.m2rl_repl_*') if os.path.exists(p + '/pid')][0]\n"
        "for p in [d + '/out-1.txt', d + '/res-1.json']:\n"
        f"    os.remove(p) if os.path.lexists(p) else None; {make}\n"
    )
    tool = PythonTool(sandbox, timeout_s=5)
    try:
        start = time.monotonic()
        tool.python(cell)
        assert time.monotonic() - start < 10
        assert tool.python("6 * 7").output == "42\n"
    finally:
        tool.close()
