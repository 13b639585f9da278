"""`pip install .` gives one import namespace with its data files, and results land in the current directory."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_one_namespace_with_its_data(tmp_path):
    leftover = not (ROOT / "build").exists()  # an in-tree build leaves build/ behind: remove what we made
    try:
        _build_and_probe(tmp_path)
    finally:
        if leftover:
            shutil.rmtree(ROOT / "build", ignore_errors=True)


def _build_and_probe(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("tide_dllm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tide"}, tops  # no top-level bench, evals or baselines
    for needed in ("tide/evals/tasks/tide_mbpp_sanitized.yaml", "tide/evals/tasks/tide_arith.yaml",
                   "tide/bench/prompts.jsonl", "tide/bench/profiles/h100-pcie5.mini.estimate.json",
                   "tide/baselines/lru.py", "tide/evals/lm_eval_cli.py", "tide/experts/host_kernel.c"):
        assert needed in names, needed
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tide-lm-eval = tide.evals.lm_eval_cli:main" in entry_points and "tide.baselines.lru" in entry_points
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import tide.hub as h, tide.bench.runner as r, tide.evals.harness as e; "
             "import tide.experts.host_kernels as k; assert k.SOURCE.is_file(); "
             "assert r.DEFAULT_PROMPTS.is_file() and (e.TASK_DIR / 'tide_arith.yaml').is_file(); "
             "assert h.results_root() == __import__('pathlib').Path.cwd() / 'results'; "
             "assert not h.in_checkout(); print(h.PACKAGE_ROOT)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(site / "tide")
