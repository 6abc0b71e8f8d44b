"""LongcatConfig: validation names the field, presets, JSON and official config.json round trips."""

from __future__ import annotations

import json

import pytest

from model import LongcatConfig, LongcatFlash
from model.config import PRESETS, ConfigError

# The official meituan-longcat/LongCat-Flash-Chat config.json keys that matter here (plus
# some we must ignore), as on the model hub.
OFFICIAL = {
    "architectures": ["LongcatFlashForCausalLM"], "model_type": "longcat_flash",
    "vocab_size": 131072, "hidden_size": 6144, "num_layers": 28, "num_attention_heads": 64,
    "ffn_hidden_size": 12288, "expert_ffn_hidden_size": 2048, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 512, "zero_expert_num": 256, "zero_expert_type": "identity",
    "moe_topk": 12, "routed_scaling_factor": 6.0, "rms_norm_eps": 1e-5, "rope_theta": 10000000.0,
    "max_position_embeddings": 131072, "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
    "attention_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(moe_topk=10, n_routed_experts=6, zero_expert_num=3), "moe_topk"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(n_routed_experts=0), "n_routed_experts"),
        (dict(zero_expert_num=-2), "zero_expert_num"),
        (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(expert_ffn_hidden_size=2.5), "expert_ffn_hidden_size"),
        (dict(zero_expert_type="copy"), "zero_expert_type"),
        (dict(shortcut="yes"), "shortcut"),
    ],
)
def test_bad_config_fails_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        LongcatConfig.preset("tiny", **overrides)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ConfigError, match="preset.*'huge'"):
        LongcatConfig.preset("huge")
    with pytest.raises(ConfigError, match="num_experts"):
        LongcatConfig.preset("tiny", num_experts=3)
    with pytest.raises(ConfigError, match="bogus"):
        LongcatConfig.from_json(json.dumps({**LongcatConfig.preset("tiny").to_dict(), "bogus": 1}))


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(name, tmp_path):
    cfg = LongcatConfig.preset(name, shortcut=False)
    assert LongcatConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert LongcatConfig.from_json(path) == cfg


def test_official_config_json_reads_as_the_longcat_flash_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL))
    assert LongcatConfig.from_hf(path) == LongcatConfig.preset("longcat-flash")
    assert LongcatConfig.from_hf(tmp_path) == LongcatConfig.preset("longcat-flash")  # a checkpoint dir


def test_transformers_config_dict_round_trips_through_from_hf():
    transformers = pytest.importorskip("transformers")
    cfg = LongcatConfig.preset("small")
    hf = transformers.LongcatFlashConfig(**cfg.to_hf_dict()).to_dict()
    back = LongcatConfig.from_hf(hf)
    assert back == LongcatConfig.preset("small", default_batch_size=1, default_seq_len=4096)


def test_presets_have_the_promised_shape():
    tiny, small, flash = (LongcatConfig.preset(n) for n in ("tiny", "small", "longcat-flash"))
    assert (tiny.hidden_size, tiny.n_routed_experts, tiny.zero_expert_num, tiny.moe_topk) == (144, 4, 2, 2)
    assert 2 <= small.num_layers <= 4 and small.n_routed_experts >= 16 and small.zero_expert_num > 0
    assert small.moe_topk >= 4
    assert (flash.n_routed_experts, flash.zero_expert_num, flash.moe_topk, flash.num_layers) == (512, 256, 12, 28)
    LongcatFlash(tiny)  # builds


def test_hf_rope_scaling_is_refused():
    with pytest.raises(ConfigError, match="rope scaling"):
        LongcatConfig.from_hf({**OFFICIAL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
