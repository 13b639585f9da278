"""The `tide` command line, through click's runner: flags, JSON output, and errors a user would meet."""

import json

from click.testing import CliRunner

from tide.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_commands():
    out = run("--help").output
    for command in ("make-checkpoint", "generate"):
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
