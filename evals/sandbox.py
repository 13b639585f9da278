"""Running generated programs (MBPP, HumanEval scoring): a fresh interpreter per program, fenced in.

Each program runs in a new `python -I` process (no environment variables, no user site) in its own session and
scratch directory, and is killed with its whole process group at the timeout. Before the program starts, the
child limits its CPU time, address space and file sizes, and fences itself in twice: the OS layer of
`fence.py` (Landlock and seccomp where the kernel has them: no writes outside the scratch directory, no new
processes, sockets or signals to others, and nothing a program can undo, ctypes included), then, in Python,
sentences for the common cases (sockets, process creation, signals, file deletion/renaming, writes outside).
The tests (trusted: the dataset's asserts) run after the program in its namespace, as one file would, with one
change: in `assert A == B`, a result whose equality is the program's own code (an `__eq__` it defined, at any depth
of a list, tuple, set or dict) does not equal a value whose equality is not, so "always equal" objects do not pass.
The caller is never forked: it may hold gigabytes of pinned memory and a CUDA context. What stays open (reading
files, the marker in the guard's memory) is listed in the README.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FILE_LIMIT_BYTES = 64 << 20

FENCE = Path(__file__).with_name("fence.py")

# Runs in the child before the program: argv = [scratch dir, memory bytes, cpu seconds, file-size bytes, marker
# fd, fence.py]; stdin holds the run's secret marker, written to the marker fd only when the program and its tests
# ran to their end. Both sources are read (and the tests compiled) before the program can touch the scratch dir.
GUARD = r"""
import ast, builtins, io, os, resource, shutil, socket, subprocess, sys
root = os.path.realpath(sys.argv[1])
memory, cpu_s, fsize = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
finished = (lambda fd, marker: lambda: os.write(fd, marker))(int(sys.argv[5]), sys.stdin.buffer.read())
sys.stdin = open(os.devnull)
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_FSIZE, fsize)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
source = open(os.path.join(root, "program.py")).read()
CHECK = "_sandbox_equal_" + os.urandom(8).hex()  # a name the program is not told

class Strict(ast.NodeTransformer):
    def visit_Assert(self, node):
        t = node.test
        if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
            node.test = ast.Call(ast.Name(CHECK, ast.Load()), [t.left, t.comparators[0]], [])
        return node

tests = compile(ast.fix_missing_locations(Strict().visit(ast.parse(open(os.path.join(root, "tests.py")).read()))),
                "tests.py", "exec")
fence = {}
exec(compile(open(sys.argv[6]).read(), sys.argv[6], "exec"), fence)
fence["fence"](root)  # the OS layer, for good: an error here fails the program rather than run it unfenced

def inside(path):
    path = os.path.realpath(os.fsdecode(path))
    return path == root or path.startswith(root + os.sep)

def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return refused

real_open, real_os_open = builtins.open, os.open
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and not inside(file):
        raise PermissionError(f"sandbox: writing {os.fsdecode(file)!r} outside the scratch directory")
    return real_open(file, mode, *args, **kwargs)

def guarded_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and not inside(path):
        raise PermissionError(f"sandbox: writing {os.fsdecode(path)!r} outside the scratch directory")
    return real_os_open(path, flags, *args, **kwargs)

def equal_check(type=type, isinstance=isinstance, getattr=getattr, any=any, realpath=os.path.realpath,
                isfile=os.path.isfile, inside=inside, attr=type.__getattribute__,
                containers=(list, tuple, set, frozenset, dict)):
    def own(value, depth=0):  # is value's equality (or an element's) code the program wrote?
        for cls in attr(type(value), "__mro__"):
            d = attr(cls, "__dict__")
            if "__eq__" not in d:
                continue
            eq = d["__eq__"]
            if not attr(cls, "__flags__") & (1 << 9) or getattr(eq, "__objclass__", None) is cls:
                break  # a type written in C, or the C slot of one made at run time
            code = getattr(getattr(eq, "__func__", eq), "__code__", None)
            if code is None:
                return True  # some other callable the program put there (a type, a builtin, a partial)
            path = realpath(code.co_filename)
            if not isfile(path) or inside(path):
                return True  # compiled from the program, or from a string it built
            break  # a library's (collections.Counter's)
        if depth < 8 and isinstance(value, containers):
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            return any(own(x, depth + 1) for x in items)
        return False

    def equal(a, b):
        result = a == b
        if result is not False and own(a) and not own(b):
            raise AssertionError("sandbox: the result equals the expected value only by the program's own __eq__")
        return result
    return equal

equal = equal_check()
builtins.open = io.open = guarded_open
os.open = guarded_os_open
DISABLED = {
    os: ["remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "link", "symlink",
         "chmod", "chown", "lchown", "chroot", "chdir", "fchdir", "kill", "killpg", "system", "popen", "fork",
         "forkpty", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
         "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "setuid", "setgid", "putenv"],
    shutil: ["rmtree", "move", "chown"],
    subprocess: ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"],
    socket: ["socket", "create_connection", "create_server", "socketpair", "fromfd"],
}
for module, names in DISABLED.items():
    for name in names:
        if hasattr(module, name):
            setattr(module, name, refuse(f"{module.__name__}.{name}"))
sys.argv = ["program.py"]
namespace = {"__name__": "__main__", "__builtins__": builtins}
exec(compile(source, "program.py", "exec"), namespace)
namespace[CHECK] = equal
exec(tests, namespace)
finished()  # not reached when the program exits early (sys.exit, SystemExit, os._exit) or an assert fails
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed", "timed out" or "failed: <last line of stderr>"


def run_program(program: str, timeout_s: float = 10.0, memory_bytes: int = 4 << 30, tests: str = "") -> Outcome:
    """Run `program`, then `tests` in its namespace, as described in the module docstring. It passes when both
    ran to their last statement (the guard then writes this run's secret marker to a pipe the program was not told
    about) and exited 0 within `timeout_s`: a program that leaves before its asserts (sys.exit(0), SystemExit,
    os._exit(0)) has not passed."""
    marker = secrets.token_hex(16).encode()
    read_end, write_end = os.pipe()
    try:
        with tempfile.TemporaryDirectory(prefix="tide-sandbox-") as scratch:
            (Path(scratch) / "program.py").write_text(program)
            (Path(scratch) / "tests.py").write_text(tests)
            cpu_s = int(timeout_s) + 1
            cmd = [sys.executable, "-I", "-c", GUARD, scratch, str(memory_bytes), str(cpu_s), str(FILE_LIMIT_BYTES),
                   str(write_end), str(FENCE)]
            env = {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
            proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True, pass_fds=(write_end,))
            os.close(write_end)
            write_end = -1
            try:
                _, err = proc.communicate(input=marker, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return Outcome(False, "timed out")
            finally:
                _kill_group(proc)  # and children it may have left behind
        os.set_blocking(read_end, False)  # the marker, if any, is in the pipe already; a stray child holds no wait
        try:
            reached_the_end = os.read(read_end, 4 * len(marker)) == marker
        except BlockingIOError:
            reached_the_end = False
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if proc.returncode == 0 and reached_the_end:
        return Outcome(True, "passed")
    if proc.returncode == 0:
        return Outcome(False, "failed: exited before its last statement (its asserts did not all run)")
    lines = err.decode(errors="replace").strip().splitlines()
    return Outcome(False, "failed: " + (lines[-1] if lines else f"exit code {proc.returncode}"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
