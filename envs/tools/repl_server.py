"""A persistent Python interpreter served INSIDE the sandbox (stdlib only, runs under the sandbox's python3).

Why files instead of a pipe: `Sandbox.exec` runs one command to completion; it cannot hold the stdin of a
process across calls. So the interpreter runs as a kept background process (`exec(..., keep_background=True)`
puts it in a session the sandbox's clean-up spares) and each `python` tool call is one short exec of
`repl_client.py`, which drops the cell into this directory and waits for the result file:

    DIR/pid          this server's pid (the client sends SIGINT to it on timeout, SIGKILL if that fails)
    DIR/req-N.py     cell N (written to a temp name, then renamed: the server never sees half a cell)
    DIR/out-N.txt    everything cell N wrote to fd 1 and 2 (so child processes' output is caught too)
    DIR/res-N.json   {"status": "ok" | "error" | "interrupted"}, written last, atomically

A timeout raises KeyboardInterrupt inside the cell (SIGINT), which ends the cell but not the interpreter.
"""

import ast
import json
import linecache
import os
import signal
import sys
import time
import traceback


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def run_cell(code, ns, filename):
    """Execute like a REPL: the value of a trailing expression is printed with repr()."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), ns)
    if last is not None:
        value = eval(compile(last, filename, "eval"), ns)
        if value is not None:
            print(repr(value))


def print_error(exc, filename):
    """The traceback from the cell's own frames on (the server's frames are noise to the model)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    sys.stderr.write("".join(traceback.format_exception(type(exc), exc, tb)))


IN_CELL = [False]


def on_sigint(signum, frame):
    # Interrupt only a running cell: a late SIGINT between cells must not break the server's bookkeeping.
    if IN_CELL[0]:
        raise KeyboardInterrupt


def serve(directory, workdir="/work"):
    signal.signal(signal.SIGINT, on_sigint)
    os.makedirs(directory, exist_ok=True)
    os.chdir(workdir if os.path.isdir(workdir) else directory)
    sys.path.insert(0, "")  # like the interactive interpreter: modules in the working directory import
    sys.stdout.reconfigure(line_buffering=True, errors="replace")
    sys.stderr.reconfigure(line_buffering=True, errors="replace")
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    write_atomic(os.path.join(directory, "pid"), str(os.getpid()))
    n = 1
    while True:
        request = os.path.join(directory, "req-%d.py" % n)
        while not os.path.exists(request):
            time.sleep(0.002)
        with open(request, encoding="utf-8", errors="replace") as f:
            code = f.read()
        fd = os.open(os.path.join(directory, "out-%d.txt" % n), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        status = "ok"
        filename = "<cell-%d>" % n
        try:
            try:
                IN_CELL[0] = True
                try:
                    run_cell(code, ns, filename)
                finally:
                    IN_CELL[0] = False
            except KeyboardInterrupt:
                status = "interrupted"
                sys.stderr.write(
                    "KeyboardInterrupt: the cell was interrupted (timeout); variables are kept\n"
                )
            except SystemExit as exc:
                status = "error"
                sys.stderr.write(
                    "SystemExit(%r): exit() ends a cell here, not the interpreter\n" % (exc.code,)
                )
            except BaseException as exc:
                status = "error"
                print_error(exc, filename)
        except KeyboardInterrupt:  # the interrupt landed while reporting: the cell is over anyway
            status = "interrupted"
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (KeyboardInterrupt, OSError, ValueError):
            pass
        write_atomic(os.path.join(directory, "res-%d.json" % n), json.dumps({"status": status}))
        n += 1


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "/work")
