"""Checkpoint round trips and the errors a user sees for broken directories."""

import json
import shutil

import pytest
import torch

from tide.checkpoint import CheckpointError, CheckpointReader, state_tensors, write_checkpoint
from tide.engine import Engine, load
from tide.experts.store import ExpertStore
from tide.model import LLaDA2Model
from tide.policy import StepInfo


def forward_logits(engine_or_model, ids):
    model = engine_or_model.model if isinstance(engine_or_model, Engine) else engine_or_model
    return model(torch.tensor([ids]), at=StepInfo(0, 0))


def test_in_memory_model_round_trips_through_sharded_files(tmp_path, tiny_cfg):
    from tide.baselines.reference import Reference
    from tide.experts.executor import MoEExecutor
    from tide.policy import PolicyContext

    torch.manual_seed(0)
    model = LLaDA2Model(tiny_cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for moe in model.moe_layers():
        moe.gate.expert_bias.normal_(std=0.1)
    store = ExpertStore(tiny_cfg, tiny_cfg.num_experts, "cpu", torch.float32)
    for layer in store.layers:
        store.host[layer].normal_(std=0.1)
    ctx = PolicyContext(tiny_cfg.num_experts, tuple(tiny_cfg.moe_layers), tiny_cfg.num_experts)
    executor = MoEExecutor(store, Reference(ctx))
    executor.warm_start()
    model.set_executor(executor)
    path = write_checkpoint(tiny_cfg, tmp_path / "ckpt", state_tensors(model, store), max_shard_bytes=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in index["weight_map"]
    loaded = load(path)
    ids = [5, 17, 99, 3, 250, 8, 1]
    assert torch.equal(forward_logits(loaded, ids), forward_logits(model, ids))


def test_single_file_checkpoint(tmp_path, tiny_dir):
    path = tmp_path / "single"
    path.mkdir()
    shutil.copy(tiny_dir / "config.json", path)
    reader = CheckpointReader(tiny_dir)
    from safetensors.torch import save_file

    save_file({n: reader.get(n) for n in reader.weight_map}, str(path / "model.safetensors"))
    a = load(path)
    b = load(tiny_dir)
    assert torch.equal(forward_logits(a, [1, 2, 3]), forward_logits(b, [1, 2, 3]))


def copy_ckpt(tiny_dir, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(tiny_dir, dst)
    return dst


def shard_of(path, name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load(tmp_path / "nope")


def test_missing_shard(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    shard = shard_of(path, "model.layers.1.mlp.experts.0.gate_proj.weight")
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load(path)


def test_tensor_missing_from_index(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.experts.7.down_proj.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.experts.7.down_proj.weight"):
        load(path)


def test_tensor_missing_from_its_shard(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.attention.dense.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{other}.*{name}"):
        load(path)


def test_shape_mismatch(tmp_path, tiny_dir, tiny_cfg):
    path = copy_ckpt(tiny_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["moe_intermediate_size"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load(path)


def test_wrong_model_type(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type"):
        load(path)


def test_corrupt_safetensors_header(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    name = shard_of(path, "model.norm.weight")
    data = bytearray((path / name).read_bytes())
    data[8:40] = b"{not json at all" + b"!" * 16
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=name):
        load(path)


def test_dtype_conversion_on_load(tiny_dir):
    engine = load(tiny_dir, dtype="bfloat16")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert engine.store.host[1].dtype == torch.bfloat16
    assert engine.model.moe_layers()[0].gate.expert_bias.dtype == torch.float32  # routing stays exact
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_dir, dtype="int8")


def test_tokenizer_round_trip(tiny_dir):
    engine = load(tiny_dir)
    text = "def f(x):\n    return x + 1  # ünïcode"
    assert engine.decode(engine.encode(text)) == text
    assert (engine.mask_id, engine.eos_id) == (258, 257)


def test_byte_table_is_tokenizers_alphabet_in_byte_order_and_tokenizers_are_saved_by_transformers(tmp_path):
    from tokenizers import pre_tokenizers

    from tide.checkpoint import _bytes_to_unicode, load_tokenizer, write_byte_tokenizer
    from tide.config import preset

    assert sorted(_bytes_to_unicode()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    write_byte_tokenizer(tmp_path, preset("tiny"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode("copy 123=")) == "copy 123="


def test_tensors_that_no_parameter_uses_are_refused_before_loading(tmp_path):
    """An extra tensor, or q/k norms under use_qk_norm: false: config.json and the weights disagree."""
    import json

    from tide.checkpoint import CheckpointError, CheckpointReader, write_random_checkpoint
    from tide.config import preset

    write_random_checkpoint(preset("tiny"), tmp_path / "m", seed=0)
    CheckpointReader(tmp_path / "m").check_no_unused()  # as written: every tensor is used
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "use_qk_norm": False}))
    with pytest.raises(CheckpointError, match="no parameter of this config.json uses: .*norm"):
        CheckpointReader(tmp_path / "m").check_no_unused()


def test_more_layers_in_config_than_in_the_weights_is_refused_at_once(tmp_path):
    import json

    from tide.checkpoint import CheckpointError, CheckpointReader, write_random_checkpoint
    from tide.config import preset

    write_random_checkpoint(preset("tiny"), tmp_path / "m", seed=0)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
    with pytest.raises(CheckpointError, match="num_hidden_layers = 10000000 but the checkpoint holds 3"):
        CheckpointReader(tmp_path / "m")  # before any model of that size is built
