"""LongCat-Flash in plain PyTorch (single device; parallelism is applied from outside).

    from model import LongcatConfig, LongcatFlash
    model = LongcatFlash(LongcatConfig.preset("small"))
    logits = model(input_ids).logits

Files, bottom-up: config.py (LongcatConfig, presets), layers.py (RMSNorm, RoPE, SwiGLU),
attention.py (MLA, KVCache), moe.py (Router, grouped experts, identity experts, MoE),
longcat.py (DecoderLayer, LongcatFlash), checkpoint.py (state-dict layouts),
counting.py (parameters, FLOPs, bytes).
"""

from model.attention import MLA, KVCache
from model.config import ConfigError, LongcatConfig
from model.counting import activated_params, total_params
from model.longcat import DecoderLayer, LongcatFlash, LongcatOutput
from model.moe import LayerRouting, MoE, Router, grouped_expert_ffn

__all__ = [
    "ConfigError", "DecoderLayer", "KVCache", "LayerRouting", "LongcatConfig", "LongcatFlash",
    "LongcatOutput", "MLA", "MoE", "Router", "activated_params", "grouped_expert_ffn", "total_params",
]
