"""--model resolution (directories, hub ids through a fake snapshot, presets), generation_config.json, stamps."""

import json
import shutil

import pytest

import tide.hub as hub
from tide.engine import load


def test_directory_wins_loudly_and_bare_preset_names_are_refused(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="write preset:mini"):
        hub.resolve_model("mini")
    shutil.copytree(tiny_dir, tmp_path / "mini")
    notes = []
    assert hub.resolve_model("mini", notes) == hub.Path("mini") and "preset:mini" in notes[0]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        hub.resolve_model("preset:huge")
    with pytest.raises(FileNotFoundError, match="not a directory, nor a hub id"):
        hub.resolve_model("./no/such/dir")


def test_hub_ids_resolve_through_snapshot_download(tmp_path, tiny_dir):
    calls = []

    def fake_snapshot(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tiny_dir)

    assert hub.resolve_model("inclusionAI/LLaDA2.0-mini", snapshot=fake_snapshot) == tiny_dir
    assert calls[0][0] == "inclusionAI/LLaDA2.0-mini"
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".py") for p in calls[0][1])  # never code

    def offline(repo_id, allow_patterns):
        raise OSError("offline mode is enabled")

    with pytest.raises(FileNotFoundError, match="could not be fetched.*HF_HOME"):
        hub.resolve_model("org/missing", snapshot=offline)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.resolve_model("org/empty", snapshot=lambda **k: str(tmp_path))


def test_generation_config_gives_ids_and_decode_defaults(tmp_path, tiny_dir):
    path = tmp_path / "m"
    shutil.copytree(tiny_dir, path)
    config = json.loads((path / "config.json").read_text())
    del config["eos_token_id"], config["mask_token_id"]
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [257, 3], "mask_token_id": 258, "max_new_tokens": 12, "block_length": 4, "do_sample": True}))
    engine = load(path)
    assert (engine.eos_id, engine.mask_id) == (257, 258)
    assert any("generation_config.json" in n for n in engine.notes)
    assert engine.decode_defaults == {"gen_length": 12, "block_length": 4}
    (path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="generation_config.json: expected a JSON object"):
        load(path)


def test_source_stamp_and_results_root(tmp_path, monkeypatch):
    assert hub.source_stamp() not in ("", "unknown")  # git describe of this checkout
    monkeypatch.chdir(tmp_path)
    assert hub.results_root() == tmp_path / "results"
    first, second = hub.new_run_dir(None, "x"), hub.new_run_dir(None, "x")
    assert first != second and first.parent == second.parent == tmp_path / "results"
    (second / "f").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        hub.new_run_dir(second, "x")
