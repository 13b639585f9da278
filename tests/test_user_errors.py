"""User errors end in one sentence and exit code 2, never a traceback; bad inputs are refused before any run."""

import json
import math
import shutil

import pytest
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
    assert cli("generate", "--model", model, *GEN, "--no-check-finite").exit_code == 0


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

    assert "threads" not in [p.name for p in train_command.params]  # one --threads: the global one
