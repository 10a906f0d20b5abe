"""`str_replace_editor`: view / create / str_replace / insert / undo_edit, with the semantics and messages of
the SWE-agent / Anthropic text-editor tool (so models trained on those transcripts read familiar replies).

Files live in the sandbox; the tool reads and writes them through `Sandbox.read_file` / `write_file`.
One deliberate difference: file contents are not `expandtabs()`-ed (the reference tool rewrites every tab in
an edited file to spaces, silently changing Makefiles and tab-indented code).

What one call costs the host is bounded: the editor reads whole files only up to `MAX_FILE_BYTES` (their
size is checked in the sandbox first, and the read itself is capped). A bigger file can still be viewed with
`view_range`: a small script inside the sandbox streams the file and returns at most `MAX_RANGE_BYTES` of
the requested lines; any other command on it is an error telling the agent to use `view_range` or bash
(`head`, `sed -n`, `sed -i`). Undo history keeps at most `MAX_HISTORY_BYTES` of earlier contents.
"""

from __future__ import annotations

import inspect
import shlex
from pathlib import PurePosixPath
from typing import Any, Literal

from m2rl.envs.tool import ToolError, ToolOutput

SNIPPET_LINES = 4
MAX_VIEW_CHARS = 16_000
MAX_FILE_BYTES = 1 << 20  # read, edited and rewritten whole by the host
MAX_RANGE_BYTES = 64 << 10  # returned by a `view_range` of a bigger file
MAX_HISTORY_BYTES = 8 << 20  # earlier contents kept for undo_edit, over all paths

# Prints the lines [first, last] (last -1: to the end) of a file of any size, at most `cap` bytes, and on
# stderr the file's line count (or a count past `last`, where it stops reading); reads 64 KiB at a time, so a
# huge single-line file costs no memory either.
_LINES_SCRIPT = r"""
import sys
path, first, last, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
line, kept, out = 1, 0, sys.stdout.buffer
with open(path, "rb") as f:
    while chunk := f.read(1 << 16):
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces):
            number = line + i
            if first <= number and (last == -1 or number <= last) and kept < cap:
                piece = piece + (b"\n" if i < len(pieces) - 1 else b"")
                out.write(piece[: cap - kept])
                kept += min(len(piece), cap - kept)
        line += len(pieces) - 1
        if last != -1 and line > last:  # the range is complete; the count only has to reach `last`
            break
sys.stderr.write(str(line))
"""


def numbered(text: str, start_line: int = 1) -> str:
    """`cat -n` style: six-wide line numbers, a tab, the line."""
    return "\n".join(f"{i + start_line:6}\t{line}" for i, line in enumerate(text.split("\n")))


def python_syntax_ok(path: str, text: str) -> bool | None:
    if not path.endswith(".py"):
        return None
    try:
        compile(text, path, "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError):
        return False


class EditorTool:
    def __init__(self, sandbox: Any, workdir: str = "/work") -> None:
        self.sandbox = sandbox
        self.workdir = workdir  # where a relative path was probably meant to be
        self.history: dict[str, list[str]] = {}  # path -> earlier contents, for undo_edit
        self._history_order: list[str] = []  # the path of every history entry, oldest first
        self._capped_reads = "max_bytes" in inspect.signature(getattr(sandbox, "read_file", lambda path: b"")).parameters

    # -------------------------------------------------------------------- sandbox file access

    def _kind(self, path: str) -> tuple[str, int]:
        """(dir | file | other | none, size in bytes of a file)."""
        script = (
            'if [ -d "$1" ]; then echo dir; elif [ -f "$1" ]; then echo file "$(stat -L -c %s -- "$1")"; '
            'elif [ -e "$1" ]; then echo other; else echo none; fi'
        )
        res = self.sandbox.exec(["bash", "-c", script, "m2rl", path], timeout=10.0)
        words = res.stdout.split()
        kind = words[0] if words else "none"
        size = int(words[1]) if kind == "file" and len(words) > 1 and words[1].isdigit() else 0
        return kind, size

    def _read(self, path: str, size: int) -> str:
        """The whole file, if it is at most MAX_FILE_BYTES (`size` from `_kind`; the read checks again:
        an agent process may have grown the file since)."""
        if size > MAX_FILE_BYTES:
            raise ToolError(_too_big(path, size))
        try:
            if self._capped_reads:
                data = self.sandbox.read_file(path, max_bytes=MAX_FILE_BYTES)
            else:
                data = self.sandbox.read_file(path)
        except Exception as exc:
            raise ToolError(f"Ran into {exc} while trying to read {path}") from None
        if len(data) > MAX_FILE_BYTES:
            raise ToolError(_too_big(path, len(data)))
        return data.decode("utf-8", "replace")

    def _remember(self, path: str, text: str) -> None:
        """Keep `text` for undo_edit, dropping the oldest entries beyond MAX_HISTORY_BYTES."""
        self.history.setdefault(path, []).append(text)
        self._history_order.append(path)
        while sum(len(t) for ts in self.history.values() for t in ts) > MAX_HISTORY_BYTES:
            oldest = self._history_order.pop(0)
            self.history[oldest].pop(0)

    def _write(self, path: str, text: str) -> None:
        try:
            self.sandbox.write_file(path, text.encode("utf-8"))
        except Exception as exc:
            raise ToolError(f"Ran into {exc} while trying to write to {path}") from None

    def _validate(self, command: str, path: str) -> tuple[str, int]:
        """(kind, size) of `path` after checking the command may run on it."""
        if not PurePosixPath(path).is_absolute():
            suggested = str(PurePosixPath(self.workdir) / path)
            raise ToolError(
                f"The path {path} is not an absolute path, it should start with `/`. "
                f"Maybe you meant {suggested}?"
            )
        kind, size = self._kind(path)
        if kind == "none" and command != "create":
            raise ToolError(f"The path {path} does not exist. Please provide a valid path.")
        if kind != "none" and command == "create":
            raise ToolError(f"File already exists at: {path}. Cannot overwrite files using command `create`.")
        if kind == "dir" and command != "view":
            raise ToolError(
                f"The path {path} is a directory and only the `view` command can be used on directories"
            )
        if kind == "other":
            raise ToolError(f"The path {path} is not a regular file or directory.")
        return kind, size

    # -------------------------------------------------------------------- the tool

    def str_replace_editor(
        self,
        command: Literal["view", "create", "str_replace", "insert", "undo_edit"],
        path: str,
        file_text: str | None = None,
        old_str: str | None = None,
        new_str: str | None = None,
        insert_line: int | None = None,
        view_range: list[int] | None = None,
    ) -> ToolOutput:
        """Custom editing tool for viewing, creating and editing files. `view` shows a file with line numbers
        (`cat -n`) or lists a directory 2 levels deep. `create` makes a new file (it cannot overwrite).
        `str_replace` replaces `old_str`, which must match exactly one place in the file (whitespace
        included), with `new_str`. `insert` adds `new_str` after line `insert_line`. `undo_edit` reverts the
        last edit.

        Args:
            command: The command to run: view, create, str_replace, insert or undo_edit.
            path: Absolute path to a file or directory, e.g. /work/file.py or /work.
            file_text: Required for `create`: the content of the file to be created.
            old_str: Required for `str_replace`: the exact text to replace.
            new_str: For `str_replace`: the replacement (omitted = delete old_str). Required for `insert`.
            insert_line: Required for `insert`: new_str is inserted AFTER this line (0 = at the top).
            view_range: Optional for `view` of a file: [start, end] line numbers (1-based, end -1 = to the
                end).
        """
        kind, size = self._validate(command, path)
        if command == "view":
            return self._view(path, kind, size, view_range)
        if command == "create":
            if file_text is None:
                raise ToolError("Parameter `file_text` is required for command: create")
            self._write(path, file_text)
            self._remember(path, "")
            return ToolOutput(
                output=f"File created successfully at: {path}",
                edits=[{"path": path, "syntax_ok": python_syntax_ok(path, file_text)}],
            )
        if command == "str_replace":
            if old_str is None:
                raise ToolError("Parameter `old_str` is required for command: str_replace")
            return self._str_replace(path, size, old_str, new_str or "")
        if command == "insert":
            if insert_line is None:
                raise ToolError("Parameter `insert_line` is required for command: insert")
            if new_str is None:
                raise ToolError("Parameter `new_str` is required for command: insert")
            return self._insert(path, size, insert_line, new_str)
        if command == "undo_edit":
            return self._undo(path)
        raise ToolError(
            f"Unrecognized command {command}. The allowed commands for the str_replace_editor tool "
            "are: view, create, str_replace, insert, undo_edit"
        )

    def _view(self, path: str, kind: str, size: int, view_range: list[int] | None) -> ToolOutput:
        if kind == "dir":
            if view_range:
                raise ToolError(
                    "The `view_range` parameter is not allowed when `path` points to a directory."
                )
            res = self.sandbox.exec(
                f"find {shlex.quote(path)} -maxdepth 2 -not -path '*/.*' | sort", timeout=15.0
            )
            if res.exit_code != 0 and not res.stdout:
                raise ToolError(res.stderr.strip() or f"could not list {path}")
            return ToolOutput(
                output=f"Here's the files and directories up to 2 levels deep in {path}, excluding "
                f"hidden items:\n{res.stdout}",
                files_viewed=[path],
            )
        if size > MAX_FILE_BYTES:
            if not view_range:
                raise ToolError(_too_big(path, size))
            text, start = self._lines_of_large_file(path, view_range)
        else:
            text, start = self._read(path, size), 1
            if view_range:
                lines = text.split("\n")
                first, last = _check_range(view_range, len(lines))
                text = "\n".join(lines[first - 1 :] if last == -1 else lines[first - 1 : last])
                start = first
        shown = numbered(text, start)
        if len(shown) > MAX_VIEW_CHARS:
            shown = shown[:MAX_VIEW_CHARS] + (
                "\n<response clipped><NOTE>To save on context only part of this file "
                "has been shown to you. Use `view_range` or grep -n to see the rest."
                "</NOTE>"
            )
        return ToolOutput(
            output=f"Here's the result of running `cat -n` on {path}:\n{shown}\n", files_viewed=[path]
        )

    def _lines_of_large_file(self, path: str, view_range: list[int]) -> tuple[str, int]:
        """(text of the requested lines, first line number), read in the sandbox at most MAX_RANGE_BYTES."""
        first, last = _check_range(view_range, None)
        res = self.sandbox.exec(
            ["python3", "-c", _LINES_SCRIPT, path, str(first), str(last), str(MAX_RANGE_BYTES)], timeout=30.0
        )
        count = res.stderr.strip().rsplit("\n", 1)[-1]
        if res.exit_code != 0 or not count.isdigit():
            raise ToolError(f"could not read lines of {path}: {res.stderr.strip()[-300:]}")
        _check_range(view_range, int(count))
        return res.stdout.removesuffix("\n"), first

    def _snippet(self, text: str, center_line: int, extra: int) -> tuple[str, int]:
        lines = text.split("\n")
        start = max(0, center_line - SNIPPET_LINES)
        end = center_line + SNIPPET_LINES + extra
        return "\n".join(lines[start : end + 1]), start + 1

    def _str_replace(self, path: str, size: int, old_str: str, new_str: str) -> ToolOutput:
        text = self._read(path, size)
        count = text.count(old_str)
        if count == 0 or old_str == "":
            raise ToolError(
                f"No replacement was performed, old_str `{old_str}` did not appear verbatim in {path}."
            )
        if count > 1:
            lines = [i + 1 for i, line in enumerate(text.split("\n")) if old_str in line]
            where = f"in lines {lines}" if lines else f"({count} times, spanning several lines)"
            raise ToolError(
                f"No replacement was performed. Multiple occurrences of old_str `{old_str}` {where}. "
                "Please ensure it is unique"
            )
        new_text = text.replace(old_str, new_str)
        self._write(path, new_text)
        self._remember(path, text)
        replacement_line = text.split(old_str)[0].count("\n")
        snippet, first = self._snippet(new_text, replacement_line, new_str.count("\n"))
        out = (
            f"The file {path} has been edited. Here's the result of running `cat -n` on a snippet of "
            f"{path}:\n"
            f"{numbered(snippet, first)}\nReview the changes and make sure they are as expected. "
            "Edit the file again if necessary."
        )
        return ToolOutput(output=out, edits=[{"path": path, "syntax_ok": python_syntax_ok(path, new_text)}])

    def _insert(self, path: str, size: int, insert_line: int, new_str: str) -> ToolOutput:
        text = self._read(path, size)
        lines = text.split("\n")
        if insert_line < 0 or insert_line > len(lines):
            raise ToolError(
                f"Invalid `insert_line` parameter: {insert_line}. It should be within the range of lines "
                f"of the file: {[0, len(lines)]}"
            )
        new_lines = new_str.split("\n")
        new_text = "\n".join(lines[:insert_line] + new_lines + lines[insert_line:])
        self._write(path, new_text)
        self._remember(path, text)
        snippet_lines = (
            lines[max(0, insert_line - SNIPPET_LINES) : insert_line]
            + new_lines
            + lines[insert_line : insert_line + SNIPPET_LINES]
        )
        out = (
            f"The file {path} has been edited. Here's the result of running `cat -n` on a snippet of the "
            "edited "
            f"file:\n{numbered(chr(10).join(snippet_lines), max(1, insert_line - SNIPPET_LINES + 1))}\n"
            "Review the changes and make sure they are as expected (correct indentation, no duplicate "
            "lines, etc). "
            "Edit the file again if necessary."
        )
        return ToolOutput(output=out, edits=[{"path": path, "syntax_ok": python_syntax_ok(path, new_text)}])

    def _undo(self, path: str) -> ToolOutput:
        if not self.history.get(path):
            raise ToolError(f"No edit history found for {path}.")
        previous = self.history[path].pop()
        self._write(path, previous)
        return ToolOutput(
            output=f"Last edit to {path} undone successfully. Here's the result of running `cat -n` "
            f"on {path}:\n{numbered(previous)}\n",
            edits=[{"path": path, "syntax_ok": python_syntax_ok(path, previous)}],
        )


def _too_big(path: str, size: int) -> str:
    return (
        f"The file {path} has {size} bytes, more than the {MAX_FILE_BYTES} bytes this editor reads whole. "
        f"View parts of it with `view_range` (e.g. [1, 100]) or with bash (`head -n 100 {path}`, "
        f"`sed -n '100,200p' {path}`, `grep -n PATTERN {path}`), and edit it with bash (`sed -i`)."
    )


def _check_range(view_range: Any, n: int | None) -> tuple[int, int]:
    """(first, last) of a valid `view_range` for a file of `n` lines (None: only its shape is checked)."""
    if (not isinstance(view_range, list) or len(view_range) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in view_range)):
        raise ToolError("Invalid `view_range`. It should be a list of two integers.")
    first, last = view_range
    if first < 1 or (n is not None and first > n):
        raise ToolError(
            f"Invalid `view_range`: {view_range}. Its first element `{first}` should be within "
            f"the range of lines of the file: {[1, n]}"
        )
    if n is not None and last > n:
        raise ToolError(
            f"Invalid `view_range`: {view_range}. Its second element `{last}` should be smaller "
            f"than the number of lines in the file: `{n}`"
        )
    if last != -1 and last < first:
        raise ToolError(
            f"Invalid `view_range`: {view_range}. Its second element `{last}` should be larger "
            f"or equal than its first `{first}`"
        )
    return first, last
