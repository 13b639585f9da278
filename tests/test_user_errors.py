"""User errors end in one sentence and exit code 2, never a traceback; bad inputs are refused before any run."""

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from tide.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sentence(res, *phrases):
    """Exit 2, an `error:`/`Error:` line naming every phrase, no traceback."""
    text = res.output
    assert res.exit_code == 2, (res.exit_code, text, res.exception)
    assert "Traceback" not in text and isinstance(res.exception, SystemExit), text
    for phrase in phrases:
        assert phrase in text, (phrase, text)


@pytest.fixture
def model(tiny_dir, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    path = tmp_path / "m"
    shutil.copytree(tiny_dir, path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


GEN = ["--prompt", "hi", "--gen-length", "8"]


@pytest.mark.parametrize("device", ["nonsense", "meta", "cuda:7"])
def test_bad_device(tiny_dir, device):
    sentence(cli("generate", "--model", tiny_dir, *GEN, "--device", device), "--device", device)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_bad_temperature(tiny_dir, value):
    sentence(cli("generate", "--model", tiny_dir, *GEN, "--temperature", value), "temperature")


def test_trace_path_is_checked_before_generating(tiny_dir, tmp_path):
    res = cli("generate", "--model", tiny_dir, *GEN, "--trace", tmp_path / "no" / "dir" / "t.jsonl")
    sentence(res, "--trace", "t.jsonl")
    assert "tokens in" not in res.output  # nothing was generated
    sentence(cli("generate", "--model", tiny_dir, *GEN, "--trace", tmp_path / "t.csv"), ".jsonl or .parquet")


def test_profile_errors_name_the_file(tiny_dir, tmp_path):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"expert_bytes": 1}))
    sentence(cli("generate", "--model", tiny_dir, *GEN, "--policy", "tide", "--profile", partial), "partial.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    sentence(cli("generate", "--model", tiny_dir, *GEN, "--policy", "tide", "--profile", garbage), "garbage.json")


def test_malformed_plan_trace(tiny_dir, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("garbage\n")
    sentence(cli("plan", "--model", tiny_dir, "--trace", trace), "t.jsonl")


def test_calibrate_options(tmp_path):
    sentence(cli("calibrate", "--repeats", "0", "--out", tmp_path / "p.json"), "--repeats")
    sentence(cli("calibrate", "--repeats", "2", "--out", tmp_path / "missing" / "p.json"), "missing")


def test_bench_out_that_cannot_be_written(tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    sentence(cli("bench", "--model", tiny_dir, "--out", blocker / "run"), "file")


@pytest.mark.parametrize("args,phrase", [(["--repeat", "0"], "--repeat"),
                                         (["--refresh-interval", "abc"], "--refresh-interval"),
                                         (["--projections", "nosuch"], "nosuch"),
                                         (["--budgets", "lots"], "lots"),
                                         (["--policies", "lru,nosuch"], "nosuch"),
                                         (["--regime", "sideways"], "sideways"),
                                         (["--prompts", "/no/such.jsonl"], "such.jsonl")])
def test_bench_options_are_checked_before_any_run(tiny_dir, tmp_path, monkeypatch, args, phrase):
    monkeypatch.chdir(tmp_path)
    sentence(cli("bench", "--model", tiny_dir, *args), phrase)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())  # no empty run folder


def test_config_json_that_is_a_list_or_unreadable(model, monkeypatch):
    (model / "config.json").write_text("[1, 2]")
    sentence(cli("generate", "--model", model, *GEN), "config.json", "JSON object")
    (model / "config.json").unlink()
    (model / "config.json").mkdir()
    sentence(cli("generate", "--model", model, *GEN), "config.json")


def test_config_json_permission_denied(model, monkeypatch):
    import pathlib

    real = pathlib.Path.read_text

    def denied(self, *a, **k):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    sentence(cli("generate", "--model", model, *GEN), "config.json", "Permission denied")


def test_absurd_vocabulary_is_refused_before_allocating(model):
    edit_config(model, vocab_size=10**12)
    sentence(cli("generate", "--model", model, *GEN), "vocab_size")


@pytest.mark.parametrize("field,value", [("rms_norm_eps", -1e-6), ("rms_norm_eps", 0), ("rope_theta", "abc"),
                                         ("rope_theta", -5), ("routed_scaling_factor", "NaN"),
                                         ("routed_scaling_factor", 0), ("max_position_embeddings", 0)])
def test_numeric_config_fields_are_validated(model, field, value):
    edit_config(model, **{field: value})
    sentence(cli("generate", "--model", model, *GEN), field)


def test_corrupt_or_sentencepiece_tokenizer_names_the_file(model):
    (model / "tokenizer.json").write_text("{broken")
    sentence(cli("generate", "--model", model, *GEN), "tokenizer.json")
    (model / "tokenizer.json").unlink()
    sentence(cli("generate", "--model", model, *GEN), "tokenizer.json")  # only tokenizer_config.json is left


def test_tokenizer_larger_than_the_model_vocabulary(model):
    edit_config(model, vocab_size=200, pad_token_id=190, eos_token_id=191, mask_token_id=192)
    from tide.checkpoint import CheckpointReader

    assert CheckpointReader  # the tensors no longer match either; the tokenizer check comes first
    sentence(cli("generate", "--model", model, *GEN), "tokenizer", "vocab")


def test_unreadable_shard_says_so(model, monkeypatch):
    import tide.checkpoint as ck

    def denied(path, **k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(ck, "safe_open", denied)
    sentence(cli("generate", "--model", model, *GEN), "Permission denied", ".safetensors")


@pytest.mark.parametrize("gen_length", ["5000", "100000"])
def test_generation_must_fit_the_positions(tiny_dir, gen_length):
    sentence(cli("generate", "--model", tiny_dir, "--prompt", "hi", "--gen-length", gen_length),
             "max_position_embeddings")


def test_prompt_longer_than_the_positions(tiny_dir):
    sentence(cli("generate", "--model", tiny_dir, "--prompt", "x" * 5000, "--gen-length", "8"),
             "max_position_embeddings")


def test_nan_weight_detected_and_the_check_can_be_skipped(model):
    from safetensors.torch import load_file, save_file

    shard = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = math.nan
    save_file(tensors, str(shard), metadata={"format": "pt"})
    sentence(cli("generate", "--model", model, *GEN), name, "finite")
    skipped = cli("generate", "--model", model, *GEN, "--no-check-finite")  # loads; a NaN reaching the logits is
    assert skipped.exit_code == 0 or "non-finite logits" in skipped.output, skipped.output  # a sentence, not tokens
    assert name not in skipped.output


def test_integer_tensor_refused(model):
    import torch
    from safetensors.torch import load_file, save_file

    shard = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    sentence(cli("generate", "--model", model, *GEN), name, "int32")


def test_checkpoint_layers_beyond_the_config(model):
    edit_config(model, num_hidden_layers=2)
    sentence(cli("generate", "--model", model, *GEN), "num_hidden_layers", "layers.2")


def test_checkpoint_code_never_runs(model, tmp_path):
    marker = tmp_path / "ran"
    (model / "tokenizer.json").unlink()
    (model / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer",
                                                                                None]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    sentence(cli("generate", "--model", model, *GEN), "code")
    assert not marker.exists()


def test_train_uses_the_global_threads():
    from tide.train import train_command

    threads = [p for p in train_command.params if p.name == "threads"]  # one --threads: the global one
    assert len(threads) == 1 and not threads[0].expose_value


def test_nothing_written_is_ever_silently_replaced(tmp_path, tiny_dir):
    """Files and directories are claimed atomically: an existing output is refused (calibrate --out, generate
    --trace), and of two commands given the same new name one gets it and the other says so."""
    from tide.hub import model_dir_writer, new_run_dir, write_new

    profile = tmp_path / "p.json"
    profile.write_text("{}")
    sentence(cli("calibrate", "--estimate", "a100-pcie4", "--out", profile), "p.json", "exists")
    assert profile.read_text() == "{}"
    trace = tmp_path / "t.jsonl"
    trace.write_text("old")
    sentence(cli("generate", "--model", tiny_dir, "--prompt", "x", "--trace", trace), "t.jsonl", "exists")
    assert trace.read_text() == "old"

    late = tmp_path / "late.json"  # created between the entry check and the write: still not replaced
    with pytest.raises(ValueError, match="exists"):
        write_new(late, lambda tmp: (late.write_text("first"), tmp.write_text("second")))
    assert late.read_text() == "first" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    run = tmp_path / "run"
    assert new_run_dir(run, "x") == run
    with pytest.raises(ValueError, match="not empty"):
        new_run_dir(run, "x")  # the second of two runs given one --out
    empty = tmp_path / "empty"
    empty.mkdir()
    new_run_dir(empty, "x")
    with pytest.raises(ValueError, match="not empty"):
        new_run_dir(empty, "x")

    out = tmp_path / "model"  # two writers that both found `out` free; the first to finish keeps it
    first, second = model_dir_writer(out), model_dir_writer(out)
    (first.__enter__() / "config.json").write_text("first")
    (second.__enter__() / "config.json").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(ValueError, match="another command wrote there"):
        second.__exit__(None, None, None)
    assert (out / "config.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_threads_is_accepted_after_every_command(tmp_path):
    import torch

    for name, command in main.commands.items():
        assert any(p.name == "threads" for p in command.params), name
    before = torch.get_num_threads()
    try:
        res = cli("calibrate", "--estimate", "a100-pcie4", "--out", tmp_path / "p.json", "--threads", 1)
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
        sentence(cli("calibrate", "--estimate", "a100-pcie4", "--out", tmp_path / "q.json", "--threads", 0),
                 "--threads")
    finally:
        torch.set_num_threads(before)


def test_a_missing_eval_extra_is_a_sentence_naming_the_extra(monkeypatch, tiny_dir):
    import importlib.util

    from tide.evals import extras

    real = importlib.util.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    sentence(cli("eval", "--model", tiny_dir), "tide eval needs lm-eval", "pip install 'tide-dllm[eval]'")
    sentence(cli("reproduce"), "tide reproduce needs lm-eval", "[eval]")
    from tide.evals.lm_eval_cli import main as lm_eval_main

    with pytest.raises(SystemExit) as exit_info:
        lm_eval_main(["--help"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("args,phrase", [
    (["generate", "--prompt", "x", "--cpu-threads", "0"], "--cpu-threads"),
    (["plan", "--max-interval", "0"], "--max-interval"),
    (["make-checkpoint", "--shard-size", "0", "--out", "{tmp}/m"], "--shard-size"),
    (["eval", "--mc-samples", "0"], "--mc-samples"),
    (["eval", "--mc-samples", "-3"], "--mc-samples"),
    (["eval", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature"),
])
def test_values_that_once_became_the_default_silently_are_refused(tmp_path, args, phrase):
    sentence(cli(*[a.format(tmp=tmp_path) for a in args]), phrase)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args,phrase", [
    (["generate", "--prompt", "x", "--seed", str(2**64)], "--seed"),
    (["train", "--out", "{tmp}/t", "--lr", "nan"], "--lr"),
    (["eval", "--limit", "0"], "--limit"),
    (["eval", "--limit", "-1"], "--limit"),
    (["train", "--out", "{tmp}/t", "--vocab-size", "10"], "--vocab-size"),
])
def test_unclear_errors_are_now_sentences_naming_the_option(tmp_path, args, phrase):
    sentence(cli(*[a.format(tmp=tmp_path) for a in args]), phrase)


def test_a_bad_generation_config_is_named(model):
    file = model / "generation_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    (model / "generation_config.json").write_text(json.dumps({**config, "steps": 0}))
    sentence(cli("generate", "--model", model, "--prompt", "x"), "generation_config.json", "steps")


def test_refused_runs_leave_no_run_directory(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    sentence(cli("reproduce", "--policies", "bogus"), "bogus")
    sentence(cli("bench", "--model", tiny_dir, "--policies", ""), "--policies")
    sentence(cli("bench", "--model", tiny_dir, "--budgets", ""), "--budgets")
    sentence(cli("generate", "--model", tiny_dir, "--prompt", "x", "--gpu-budget", "inf"), "inf")
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


@pytest.mark.parametrize("template,phrase", [("{{ raise_exception('no system role') }}", "no system role"),
                                             ("{% for %}", "TemplateSyntaxError"),
                                             ("{{ ''.__class__.__mro__ }}", "chat template failed")])
def test_a_chat_template_that_fails_is_a_sentence(model, template, phrase):
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    sentence(cli("generate", "--model", model, "--prompt", "x", "--chat", "--gen-length", "8"), phrase)


def test_mask_ids_in_the_prompt_are_refused(model):
    from tide.config import ModelConfig

    mask = ModelConfig.from_json(model / "config.json").mask_token_id
    sentence(cli("generate", "--model", model, "--prompt-ids", f"1,{mask},2"), "mask token id")


def test_finite_weights_that_would_overflow_in_the_forward_are_refused_at_load(model):
    from safetensors.torch import load_file, save_file

    shard = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("word_embeddings.weight") or n.endswith("embed_tokens.weight"))
    tensors[name] = torch.full_like(tensors[name], 3e38)
    save_file(tensors, shard, metadata={"format": "pt"})
    sentence(cli("generate", "--model", model, "--prompt-ids", "1,2,3", "--gen-length", "8"), name, "overflow")


@pytest.mark.parametrize("args,phrase", [(["--model", "/no/such/model"], "such"),
                                         (["--policies", "nonsense"], "nonsense"), (["--budgets", "lots"], "lots"),
                                         (["--gen-length", "0"], "--gen-length")])
def test_soak_has_the_same_error_path(tmp_path, monkeypatch, args, phrase):
    from tide.bench.soak import main as soak

    monkeypatch.chdir(tmp_path)
    sentence(CliRunner().invoke(soak, ["--requests", "2", *args]), phrase)
    assert not (tmp_path / "results").exists()


def test_a_killed_writers_temp_directory_is_cleaned_by_the_next(tmp_path):
    import subprocess
    import sys

    from tide.hub import model_dir_writer

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = tmp_path / f".model.{dead}.abc.tmp"
    orphan.mkdir()
    (orphan / "model.safetensors").write_text("half")
    with model_dir_writer(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not orphan.exists() and (tmp_path / "model" / "config.json").is_file()


def test_a_prompt_that_is_not_utf8_is_a_sentence(tiny_dir):
    sentence(cli("generate", "--model", tiny_dir, "--prompt", "a\udcffb", "--gen-length", "8"), "not valid UTF-8")


def test_a_full_disk_names_the_file(tmp_path):
    import errno

    from tide.hub import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "bench.csv", full)
    assert info.value.filename == str(tmp_path / "bench.csv") and info.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


def test_tide_lm_eval_model_args_errors_are_sentences(tiny_dir, tmp_path, monkeypatch, capsys):
    """The issue's `L` probes through lm-eval's own command line (tide-lm-eval): each bad model_args value, a
    missing checkpoint and a hub id that is neither reachable nor cached end in one `error:` line, exit 2."""
    import huggingface_hub

    from tide.evals.lm_eval_cli import main as lm_eval_main

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    for model_args, phrase in [(f"pretrained={tiny_dir},gpu_budget=garbage", "gpu budget 'garbage'"),
                               (f"pretrained={tiny_dir},gpu_budget=0/layer", "at least one expert"),
                               (f"pretrained={tiny_dir},policy=nonsense", "unknown policy 'nonsense'"),
                               (f"pretrained={tmp_path / 'none'}", "not a directory"),
                               ("pretrained=org/not-cached", "could not be fetched or found in the cache")]:
        with pytest.raises(SystemExit) as exit_info:
            lm_eval_main(["--model", "tide", "--model_args", model_args, "--tasks", "tide_arith", "--limit", "1",
                          "--device", "cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
        assert any(line.startswith("error:") and phrase in line for line in err.splitlines()), (phrase, err[-2000:])
