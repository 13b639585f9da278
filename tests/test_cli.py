"""The `tide` command line, through click's runner: flags, JSON output, and errors a user would meet."""

import json
import os

import pytest
from click.testing import CliRunner

from tide.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_commands():
    out = run("--help").output
    for command in ("make-checkpoint", "generate", "calibrate", "plan"):
        assert command in out


def test_make_checkpoint_and_generate_json(tmp_path):
    res = run("make-checkpoint", "--preset", "tiny", "--layers", "2", "--out", tmp_path / "m", "--seed", 3)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 2
    res = run("generate", "--model", tmp_path / "m", "--prompt", "hello", "--gen-length", 16, "--block-length", 8,
              "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert len(out["tokens"]) == 16 and isinstance(out["text"], str)
    stats = out["stats"]
    assert stats["forwards"] >= 2 and stats["tokens_per_s"] > 0
    assert set(stats["routed_tokens_per_layer"]) == {"1"}  # layer 0 is dense
    ids = run("generate", "--model", tmp_path / "m", "--prompt-ids", "104,101,108,108,111", "--gen-length", 16,
              "--block-length", 8, "--regime", "full", "--json")
    assert json.loads(ids.output.strip().splitlines()[-1])["tokens"] == out["tokens"]


def test_generate_errors_are_sentences(tmp_path, tiny_dir):
    res = run("generate", "--model", tmp_path / "missing", "--prompt", "x")
    assert res.exit_code == 2 and "not a directory" in res.output
    res = run("generate", "--model", tiny_dir, "--prompt", "x", "--prompt-ids", "1")
    assert res.exit_code == 2 and "exactly one" in res.output
    res = run("generate", "--model", tiny_dir, "--prompt-ids", "1,x")
    assert res.exit_code == 2 and "comma-separated" in res.output
    res = run("generate", "--model", tiny_dir, "--prompt", "x", "--threshold", "2")
    assert res.exit_code == 2 and "threshold" in res.output
    res = run("make-checkpoint", "--out", tmp_path / "bad", "--layers", "0")
    assert res.exit_code == 2 and "num_hidden_layers" in res.output


def test_calibrate_plan_and_traced_tide_run(tmp_path, tiny_dir):
    profile = tmp_path / "p.json"
    res = run("calibrate", "--model", tiny_dir, "--repeats", 2, "--out", profile)
    assert res.exit_code == 0 and "measured" in res.output, res.output
    est = run("calibrate", "--preset", "mini", "--estimate", "a100-pcie4", "--out", tmp_path / "a100.json")
    assert "estimate" in est.output and "25.0 GB/s" in est.output
    res = run("plan", "--model", tiny_dir, "--gpu-budget", "4/layer", "--profile", profile, "--max-interval", 6)
    assert res.exit_code == 0, res.output
    assert "<- chosen" in res.output and "drift d" in res.output and res.output.count("\n") >= 9
    trace = tmp_path / "t.jsonl"
    res = run("generate", "--model", tiny_dir, "--prompt", "abc", "--gen-length", 16, "--block-length", 8,
              "--policy", "tide", "--gpu-budget", "4/layer", "--profile", profile, "--trace", trace, "--json")
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["stats"]["trace"] == str(trace) and trace.is_file()
    assert any("refresh interval" in n for n in out["notes"])
    res = run("plan", "--model", tiny_dir, "--gpu-budget", "4/layer", "--profile", profile, "--trace", trace)
    assert res.exit_code == 0 and "<- chosen" in res.output
    res = run("generate", "--model", tiny_dir, "--prompt", "abc", "--policy", "tide", "--refresh-interval", "0")
    assert res.exit_code == 2 and "--refresh-interval" in res.output


def test_generate_a_file_of_prompts_batched(tmp_path, tiny_dir):
    """--prompts FILE.jsonl decodes every prompt; --batch-size 3 gives each the tokens it gets alone."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in ("copy 12=", "rev 4821=", "07+35=", "a longer prompt here",
                                                          "x")) + "\n")
    runs = {}
    for batch in ("1", "3"):
        res = CliRunner().invoke(main, ["--threads", "1", "generate", "--model", str(tiny_dir), "--prompts",
                                        str(prompts), "--batch-size", batch, "--gen-length", "16",
                                        "--block-length", "8", "--dtype", "float32", "--json"])
        assert res.exit_code == 0, res.output
        runs[batch] = json.loads(res.output.strip().splitlines()[-1])
    assert len(runs["3"]["outputs"]) == 5 and runs["3"]["stats"]["batch_size"] == 3
    assert [o["tokens"] for o in runs["3"]["outputs"]] == [o["tokens"] for o in runs["1"]["outputs"]]
    assert runs["3"]["stats"]["forwards"] < runs["1"]["stats"]["forwards"]
    for args, phrase in ((["--prompt", "x", "--batch-size", "2"], "--batch-size batches"),
                         (["--prompt", "x", "--prompts", str(prompts)], "exactly one of"),
                         (["--prompts", str(tmp_path / "missing.jsonl")], "--prompts")):
        res = CliRunner().invoke(main, ["generate", "--model", str(tiny_dir), *args])
        assert res.exit_code == 2 and phrase in res.output and "Traceback" not in res.output, res.output


ENTRY_POINTS = {  # how each entry point starts: `tide`, `tide-lm-eval`, and the studies run with python -m
    "tide": "import tide.cli",
    "tide-lm-eval": "import tide.evals.lm_eval_cli as m\ntry:\n    m.main(['--help'])\nexcept SystemExit:\n    pass",
    "host_tier": "import tide.bench.host_tier",
    "soak": "import tide.bench.soak\nimport torch",
    "microbench": "import tide.bench.micro.conftest\nimport torch",
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_sets_passive_openmp_waits_before_torch_loads(entry):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: an entry point that sets it later (or never) leaves
    the main thread's OpenMP team spinning beside the host-tier workers (measured on a 2-core host: the host tier
    at 1 token per expert ran at 0.50-0.68 of the read bandwidth instead of 0.72-0.79)."""
    import subprocess
    import sys

    probe = ("import os, sys\n"
             "class AtTorch:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch':\n"
             "            print('OMP_WAIT_POLICY at torch:', os.environ.get('OMP_WAIT_POLICY'), flush=True)\n"
             "            sys.meta_path.remove(self)\n"
             "sys.meta_path.insert(0, AtTorch())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", probe + ENTRY_POINTS[entry]], capture_output=True, text=True,
                          env=env, timeout=300)
    assert "OMP_WAIT_POLICY at torch: PASSIVE" in done.stdout, (done.stdout[-2000:], done.stderr[-2000:])
