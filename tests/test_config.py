import json

import pytest

from tide.config import DecodeConfig, ModelConfig, preset

# Literal copy of LLaDA2.0-mini's config.json numbers (shared/design/llada2.md).
MINI = dict(vocab_size=157184, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
            num_key_value_heads=4, head_dim=128, intermediate_size=5120, moe_intermediate_size=512,
            num_experts=256, num_experts_per_tok=8, num_shared_experts=1, first_k_dense_replace=1, n_group=8,
            topk_group=4, routed_scaling_factor=2.5, score_function="sigmoid", norm_topk_prob=True,
            moe_router_enable_expert_bias=True, router_dtype="fp32", partial_rotary_factor=0.5,
            rope_theta=600000, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=32768,
            tie_word_embeddings=False, use_qkv_bias=False, use_bias=False, use_qk_norm=True, pad_token_id=156892,
            dtype="bfloat16")


def test_mini_preset_equals_official_numbers():
    cfg = preset("mini")
    for name, value in MINI.items():
        assert getattr(cfg, name) == value, name
    assert cfg.rotary_dim == 64
    assert cfg.expert_params * 2 == 6_291_456  # 6.29 MB per bf16 expert
    assert len(cfg.moe_layers) == 19


def test_flash_preset_shape():
    cfg = preset("flash")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.moe_intermediate_size, cfg.intermediate_size) == (
        4096, 32, 1024, 9216)
    assert cfg.expert_params * 2 == 25_165_824


def test_official_style_config_parses(tmp_path):
    raw = dict(MINI, model_type="llada2_moe", torch_dtype="bfloat16", architectures=["LLaDA2MoeModelLM"],
               auto_map={"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig"}, use_cache=False)
    raw.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.dtype == "bfloat16" and cfg.extra["architectures"] == ["LLaDA2MoeModelLM"]
    assert cfg.mask_token_id is None  # official configs do not carry it
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # round trip keeps the unknown keys


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_key_value_heads": 3}, "num_attention_heads"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"score_function": "softmax"}, "score_function"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
    ({"dtype": "int8"}, "dtype"),
    ({"mask_token_id": 10**9}, "mask_token_id"),
])
def test_bad_config_names_the_field(change, field):
    raw = {**MINI, "model_type": "llada2_moe", **change}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(raw)


def test_missing_field_is_named():
    raw = dict(MINI, model_type="llada2_moe")
    raw.pop("num_experts")
    with pytest.raises(ValueError, match="num_experts"):
        ModelConfig.from_dict(raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path / "config.json")


def test_decode_config_validation():
    assert DecodeConfig().effective_steps == 32
    assert DecodeConfig(gen_length=16, steps=32).effective_steps == 16  # min(steps, gen_length // minimal_topk)
    with pytest.raises(ValueError, match="regime"):
        DecodeConfig(regime="paged")
    with pytest.raises(ValueError, match="threshold"):
        DecodeConfig(threshold=1.5)


@pytest.mark.parametrize("change,phrase", [
    ({"norm_topk_prob": "no"}, "norm_topk_prob"), ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"mask_token_id": 3.0}, "mask_token_id"), ({"use_qk_norm": 1}, "use_qk_norm"),
])
def test_fields_that_change_the_function_are_checked_not_coerced(change, phrase):
    from tide.config import ModelConfig, preset

    raw = preset("tiny").to_dict()
    with pytest.raises(ValueError, match=phrase):
        ModelConfig.from_dict({**raw, **change})


def test_mask_id_equal_to_eos_is_refused():
    from tide.config import ModelConfig, preset

    raw = preset("tiny").to_dict()
    with pytest.raises(ValueError, match="mask_token_id"):
        ModelConfig.from_dict({**raw, "mask_token_id": raw["eos_token_id"]})
