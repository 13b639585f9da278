"""Outputs that never collide or vanish: run directories, result files and models written as a unit."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tide.cli import main
from tide.hub import atomic_write, model_dir_writer, new_run_dir

BENCH = ["bench", "--policies", "reference,lru", "--budgets", "4/layer", "--regime", "block-kv", "--repeat", "1",
         "--gen-length", "8", "--block-length", "8", "--projections", ""]


def test_two_benches_started_together_write_two_complete_run_directories(tiny_dir, tmp_path):
    """Same second, default --out, two processes: two run directories, each with its own complete files."""
    cmd = [sys.executable, "-m", "tide.cli", "--threads", "1", *BENCH, "--model", str(tiny_dir)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        p.communicate(timeout=600)
        assert p.returncode == 0
    runs = sorted((tmp_path / "results").iterdir())
    assert len(runs) == 2, runs
    for run in runs:
        assert {"bench.csv", "bench.md", "bench.png", "env.json"} <= {f.name for f in run.iterdir()}
        assert not [f for f in run.iterdir() if f.name.startswith(".")]  # no temp file left behind
        assert len((run / "bench.csv").read_text().splitlines()) == 3  # header + its own two runs


def test_run_directories_are_unique_under_threads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(new_run_dir(None, "x"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8


def test_atomic_write_never_leaves_a_temp_or_half_file(tmp_path):
    target = tmp_path / "r.csv"
    atomic_write(target, "a,b\n")
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("stop"))))
    assert target.read_text() == "a,b\n" and [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_models_are_written_as_a_unit(tmp_path):
    out = tmp_path / "m"
    run = lambda *a: CliRunner().invoke(main, ["make-checkpoint", "--preset", "tiny", "--out", str(out), *a])  # noqa: E731
    assert run("--seed", "1").exit_code == 0
    (out / "stale.txt").write_text("from an older model")
    res = run("--seed", "2")
    assert res.exit_code == 2 and "--overwrite" in res.output and (out / "stale.txt").exists()
    assert run("--seed", "2", "--overwrite").exit_code == 0
    assert not (out / "stale.txt").exists()  # replaced whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old directory left
    assert oct((out).stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_keeps_the_old_model(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError), model_dir_writer(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
        raise RuntimeError("interrupted")
    assert (out / "config.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m"]


TRAIN = ["train", "--steps", "4", "--batch-size", "2", "--task-batch-size", "2", "--seq-len", "32", "--vocab-size",
         "300", "--hidden-size", "32", "--layers", "2", "--experts", "16", "--log-every", "1", "--eval-every", "4"]


@pytest.mark.slow
def test_sigint_during_train_leaves_the_old_model_or_the_new_one(tmp_path):
    """Ctrl-C (SIGINT to the process) at several points of `tide train --overwrite`: what is at --out always loads,
    and it is the old model or the complete new one."""
    from tide.checkpoint import CheckpointReader

    out = tmp_path / "m"
    assert CliRunner().invoke(main, ["make-checkpoint", "--preset", "tiny", "--out", str(out)]).exit_code == 0
    old = (out / "config.json").read_text()
    cmd = [sys.executable, "-m", "tide.cli", "--threads", "1", *TRAIN, "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]
    duration = time.perf_counter() - t0
    seen = set()
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.05):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=900)
        reader = CheckpointReader(out)  # loads: config, index and every shard present
        assert reader.config.num_hidden_layers in (3, 2)
        seen.add("old" if (out / "config.json").read_text() == old else "new")
        if (out / "config.json").read_text() != old:
            assert (out / "tokenizer.json").is_file() and (out / "metrics.json").is_file()  # the complete new one
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert seen  # (which ones depends on timing; both are allowed)
