"""Data parallelism through torch.distributed (issue 23): lm-eval's protocol under torchrun, on the CPU (gloo)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tide.evals.distributed import Group, from_env, rank_device, timeout_s

pytest.importorskip("lm_eval")

MODEL_ARGS = "dtype=float32,gen_length=16,block_length=8,steps=8,mc_samples=4"
TIMING = ("date", "total_evaluation_time_seconds", "task_hashes")  # task_hashes: a hash of the samples in rank order
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_group_from_the_launchers_environment():
    assert from_env({}) == Group() and not Group().active
    group = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert group == Group(3, 4, 1, 2) and group.active
    for env, name in [({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                                                                "RANK"),
                      ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
                      ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK")]:
        with pytest.raises(ValueError, match=name):
            from_env(env)
    assert rank_device("cpu", group) == "cpu" and rank_device("cuda:0", Group()) == "cuda:0"
    assert timeout_s({}) == 600.0 and timeout_s({"TIDE_DIST_TIMEOUT_S": "30"}) == 30.0
    with pytest.raises(ValueError, match="TIDE_DIST_TIMEOUT_S"):
        timeout_s({"TIDE_DIST_TIMEOUT_S": "0"})


LAUNCHERS = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"],
             # accelerate's multi-process launcher; --multi_gpu on a machine without one: gloo ranks on the CPU
             "accelerate": [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                            "--num_processes"]}


def lm_eval(out: Path, nproc: int, *extra: str, script: list[str] | None = None,
            launcher: str = "torchrun") -> subprocess.CompletedProcess:
    entry = script or ["-m", "tide.evals.lm_eval_cli"]
    launch = [*LAUNCHERS[launcher], str(nproc)] if nproc > 1 else [sys.executable]
    if nproc > 1 and entry[0] == "-m":
        launch += ["-m", entry[1]]
    else:
        launch += entry
    tasks = "tide_arith,tide_arith_mc"
    args = ["--model", "tide", "--model_args", MODEL_ARGS, "--tasks", tasks, "--limit", "6", "--device", "cpu",
            "--log_samples", "--output_path", str(out), *extra]
    return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600, env=ENV, cwd=out.parent)


def results(out: Path) -> tuple[dict, dict]:
    path = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    assert len(path) == 1, path
    res = json.loads(Path(path[0]).read_text())
    samples = {}
    for task in ("tide_arith", "tide_arith_mc"):
        (f,) = glob.glob(str(out / "**" / f"samples_{task}_2*.jsonl"), recursive=True)
        samples[task] = {s["doc_id"]: s for s in map(json.loads, Path(f).read_text().splitlines())}
    return {k: v for k, v in res.items() if k not in TIMING}, samples


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_under_a_launcher_write_what_one_process_writes(tmp_path, launcher):
    """tide-lm-eval under `torchrun --nproc-per-node 2` and `accelerate launch --num_processes 2` (gloo on the CPU):
    lm-eval shards the requests by rank and gathers them to rank 0, which writes the same results JSON (less timing
    fields and the order-dependent task hash) and the same samples, doc by doc, as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = [lm_eval(one, 1), lm_eval(two, 2, launcher=launcher)]
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    (res1, samples1), (res2, samples2) = results(one), results(two)
    assert res2 == res1
    assert samples2 == samples1 and len(samples1["tide_arith"]) == 6


def test_a_rank_that_raises_ends_the_run_with_a_sentence_naming_it(tmp_path):
    """Rank 1 raises mid-run: it prints one sentence naming itself and exits; torchrun's agent stops rank 0 (which
    waits in a collective) well inside the process group's timeout, never a hang."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os\n"
        "import tide.evals.lm_eval_model as m\n"
        "from tide.evals.lm_eval_cli import main\n"
        "real = m.TideLM.generate_until\n"
        "def broken(self, requests, disable_tqdm=False):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('the expert store lost a layer (injected)')\n"
        "    return real(self, requests, disable_tqdm)\n"
        "m.TideLM.generate_until = broken\n"
        "main()\n")
    start = time.monotonic()
    done = lm_eval(tmp_path / "out", 2, script=[str(script)])
    assert done.returncode != 0 and time.monotonic() - start < 300
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: rank")]
    failed = [x for x in lines if "stopped: another rank failed" not in x]
    assert len(failed) == 1 and "rank 1 of 2" in failed[0] and "lost a layer" in failed[0], done.stderr[-3000:]
    assert all("rank 0 of 2" in x for x in lines if x not in failed)  # rank 0, if it noticed, says why it stopped


def tide_eval(out: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tide")
    args = ["eval", "--policies", "reference,full-offload,lru,cpu-fallback,accelerate,tide", "--budgets", "50%",
            "--limit", "4", "--gen-length", "16",
            "--block-length", "8", "--steps", "8", "--mc-samples", "4", "--dtype", "float32", "--log-samples",
            "--out", str(out), *extra]
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, env=ENV, cwd=out.parent)


def test_tide_eval_nproc_2_equals_one_rank(tmp_path):
    """`tide eval --nproc 2` starts itself through torch.distributed.run: each rank evaluates half of every run's
    requests, rank 0 writes the one directory; metrics, identity columns and per-sample outputs equal one rank's,
    requests.csv says which rank served each request, and the throughput is the whole run's and each rank's."""
    import pandas as pd

    one, two = tmp_path / "one", tmp_path / "two"
    for out, extra in ((one, ()), (two, ("--nproc", "2"))):
        done = tide_eval(out, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["ranks"] == 2
    a, b = pd.read_csv(one / "eval.csv"), pd.read_csv(two / "eval.csv")
    same = ["task", "metric", "value", "stderr", "policy", "budget", "regime", "samples", "generated_tokens",
            "forwards", "identical_fraction", "identical_to_tier_matched", "lossless"]
    pd.testing.assert_frame_equal(a[same], b[same])
    assert set(a.ranks) == {1} and set(b.ranks) == {2} and b.tokens_per_s_per_rank.notna().any()
    ra, rb = pd.read_csv(one / "requests.csv"), pd.read_csv(two / "requests.csv")
    assert len(ra) == len(rb) and set(ra["rank"]) == {0} and set(rb["rank"]) == {0, 1}
    runs = sorted(p.name for p in (one / "lm_eval").iterdir())
    assert runs == sorted(p.name for p in (two / "lm_eval").iterdir()) and len(runs) == 6, runs  # every policy
    for run in runs:
        for task in ("tide_arith", "tide_arith_mc"):
            outputs = []
            for out in (one, two):
                (f,) = glob.glob(str(out / "lm_eval" / run / "**" / f"samples_{task}_2*.jsonl"), recursive=True)
                outputs.append({s["doc_id"]: (s["resps"], s["filtered_resps"])
                                for s in map(json.loads, Path(f).read_text().splitlines())})
            assert outputs[0] == outputs[1] and len(outputs[0]) == 4, (run, task)
    assert not (two.parent / "results").exists()  # ranks other than 0 wrote nothing anywhere


# ---- one host master per machine ---------------------------------------------------------------------------------
def test_shared_master_filled_by_one_rank_is_read_by_the_other_and_leaves_no_file(tmp_path):
    """Two local ranks as two threads (the barrier a threading.Barrier): rank 0 creates and fills the files, rank 1
    maps them read-only after the first barrier and sees rank 0's bytes; after `filled` the directory is gone while
    both mappings stay readable."""
    import threading

    import torch

    from tide.experts.masters import SharedMaster

    directory, meet = tmp_path / "tide-job" / "model", threading.Barrier(2, timeout=60)
    masters = [SharedMaster(directory, rank, 2, barrier=meet.wait) for rank in (0, 1)]
    got: dict[int, dict] = {}

    def reader():
        got[1] = masters[1].arenas([1, 3], 4, 96, torch.bfloat16)
        masters[1].filled()

    thread = threading.Thread(target=reader)
    thread.start()
    got[0] = masters[0].arenas([1, 3], 4, 96, torch.bfloat16)
    assert masters[0].fills and not masters[1].fills and masters[1].read_only
    for layer, arena in got[0].items():
        arena.copy_(torch.arange(4 * 96, dtype=torch.float32).view(4, 96) * layer)
    masters[0].filled()
    thread.join(60)
    assert not directory.exists() and not thread.is_alive()
    for layer in (1, 3):
        assert torch.equal(got[1][layer], got[0][layer]) and got[1][layer].shape == (4, 96)
        assert got[1][layer].data_ptr() != got[0][layer].data_ptr()  # two mappings of the same pages


def test_shared_master_refuses_a_small_tmpfs_in_a_sentence_and_sweeps_crashed_runs(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    import torch

    import tide.experts.masters as masters

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / "tide-old-run" / "model"
    stale.mkdir(parents=True)
    (stale / masters.OWNER).write_text(f"{gone.pid}\n")
    live = tmp_path / "tide-live-run" / "model"
    live.mkdir(parents=True)
    (live / masters.OWNER).write_text(f"{os.getpid()}\n")
    assert masters.sweep_stale(tmp_path) == [stale] and live.exists() and not stale.exists()

    monkeypatch.setattr(masters.os, "statvfs", lambda path: SimpleNamespace(f_bavail=16, f_frsize=4 << 20))
    master = masters.SharedMaster(tmp_path / "tide-new" / "model", 0, 2, barrier=lambda: None)
    with pytest.raises(ValueError, match=r"needs 0\.84 GB.*--shm-size=2g.*--shm-dir"):
        master.arenas([0, 1], 100, 1 << 20, torch.float32)
    assert not (tmp_path / "tide-new" / "model").exists()


SHARED_PROBE = """
import json, os, re, sys, time
from pathlib import Path
import torch.distributed as dist
from tide.config import DecodeConfig
from tide.engine import load
from tide.evals.distributed import join, shared_master
model, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
group = join("cpu")
shm = os.environ["TIDE_SHM_DIR"]
master = shared_master(group, model, "bfloat16", shm) if mode in ("shared", "die", "int") else None
if mode == "die" and group.local_rank == 1:
    os.kill(os.getpid(), 9)  # rank 1 dies before it maps: rank 0 has filled the files and waits at the barrier
if mode == "int" and group.local_rank == 0:  # Ctrl-C reaches rank 0 once the files are filled, before sharing
    import signal
    from tide.experts.masters import SharedMaster
    SharedMaster.filled = lambda self: os.kill(os.getpid(), signal.SIGINT)
engine = load(model, policy="cpu-fallback", gpu_budget="2/layer", dtype="bfloat16", cpu_threads=1, host_master=master)
rollup = Path("/proc/self/smaps_rollup").read_text()
kb = {k: int(v) for k, v in re.findall(r"^(\\w+):\\s+(\\d+) kB", rollup, re.M)}
tokens = engine.generate(engine.tokenizer("copy 12=")["input_ids"], DecodeConfig(gen_length=8, block_length=8,
                                                                                  steps=4)).tokens
parts = [None, None]
dist.all_gather_object(parts, {"pss_kb": kb["Pss"], "tokens": list(tokens),
                               "left": sorted(str(p) for p in Path(shm).rglob("*")) if Path(shm).is_dir() else []})
if group.rank == 0:
    (out / f"{mode}.json").write_text(json.dumps(parts))
dist.barrier()
"""


@pytest.fixture(scope="module")
def master_dir(tmp_path_factory):
    """A random checkpoint whose host master (2 MoE layers x 64 experts of 196 kB in bf16, 25 MB) dwarfs the rest."""
    from tide.checkpoint import write_random_checkpoint
    from tide.config import preset

    cfg = preset("tiny", hidden_size=256, moe_intermediate_size=128, num_experts=64, num_hidden_layers=3,
                 num_experts_per_tok=4, n_group=4, topk_group=2, dtype="bfloat16")
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp("master")), cfg


def shared_run(tmp_path: Path, model: Path, mode: str, shm: Path) -> subprocess.CompletedProcess:
    probe = tmp_path / "probe.py"
    probe.write_text(SHARED_PROBE)
    env = {**ENV, "TIDE_SHM_DIR": str(shm), "TIDE_DIST_TIMEOUT_S": "60"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(probe),
                           str(model), str(tmp_path), mode], capture_output=True, text=True, timeout=300, env=env)


def test_two_ranks_on_one_machine_hold_one_host_master_and_leave_nothing_behind(tmp_path, master_dir):
    """With two local ranks the machine holds the routed experts once: the ranks' proportional set sizes together
    grow by about one host master over two private ones' (measured from /proc/self/smaps_rollup), /dev/shm's files
    are unlinked once both ranks mapped them (none left while the ranks run, nor after), and the ranks decode the
    same tokens as with private masters."""
    model, cfg = master_dir
    arena_kb = len(cfg.moe_layers) * cfg.num_experts * cfg.expert_params * 2 / 1024
    shm = tmp_path / "shm"
    for mode in ("private", "shared"):
        done = shared_run(tmp_path, model, mode, shm)
        assert done.returncode == 0, done.stderr[-3000:]
    private, shared = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("private", "shared"))
    saved_kb = sum(p["pss_kb"] for p in private) - sum(p["pss_kb"] for p in shared)
    assert 0.8 * arena_kb < saved_kb < 1.2 * arena_kb, (saved_kb, arena_kb)  # one copy saved of the two
    assert [p["tokens"] for p in shared] == [p["tokens"] for p in private]
    assert all(p["left"] == [] for p in shared)  # unlinked while the ranks still run
    assert not shm.is_dir() or not list(shm.iterdir())


@pytest.mark.parametrize("mode", ["die", "int"])
def test_a_rank_killed_or_interrupted_while_the_master_loads_leaves_no_file(tmp_path, master_dir, mode):
    """die: rank 1 is killed (SIGKILL) after rank 0 filled the shared files and before it mapped them, so torchrun
    stops rank 0 (SIGTERM), whose handler removes the files. int: rank 0 gets SIGINT (Ctrl-C) there and removes
    them on its way out. Either way the run fails and nothing stays in the shared-memory directory."""
    model, _ = master_dir
    shm = tmp_path / "shm"
    start = time.monotonic()
    done = shared_run(tmp_path, model, mode, shm)
    assert done.returncode != 0 and time.monotonic() - start < 240
    assert not shm.is_dir() or not list(shm.iterdir()), sorted(shm.rglob("*"))


def test_tide_reproduce_nproc_2_equals_one_rank(tmp_path):
    """`tide reproduce --nproc 2`: the paper's pipeline on the built-in model over two ranks writes one results
    directory whose metrics and identity columns are one rank's (eval.csv, behind Table 1), with `ranks` 2, and
    Table 1 says how many ranks produced each row."""
    import pandas as pd

    exe = Path(sys.executable).with_name("tide")
    tables = []
    for nproc in (1, 2):
        out = tmp_path / f"rep{nproc}"
        done = subprocess.run([str(exe), "reproduce", "--policies", "reference,tide", "--limit", "2", "--nproc",
                               str(nproc), "--out", str(out)], capture_output=True, text=True, timeout=900, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        tables.append(pd.read_csv(out / "eval.csv"))
        assert "| ranks " in (out / "reproduce.md").read_text()
    same = ["task", "metric", "value", "policy", "budget", "regime", "samples", "identical_fraction", "lossless"]
    pd.testing.assert_frame_equal(tables[0][same], tables[1][same])
    assert set(tables[0]["ranks"]) == {1} and set(tables[1]["ranks"]) == {2}
