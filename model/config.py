"""LongCat-Flash configuration: one dataclass, its validation, presets, JSON in and out.

Field names follow the official `config.json` keys where one exists (`hidden_size`,
`num_layers`, `n_routed_experts`, `zero_expert_num`, `moe_topk`, ...), so
`LongcatConfig.from_hf(path)` reads a hub config directly. Fields that are ours are the
variant switches (`shortcut`) and the default profiling shape (`default_batch_size`,
`default_seq_len`), which the profiler and the simulator read to size one step.

Presets:
    tiny           unit tests: a forward over a few tokens in milliseconds
    small          live CPU profiling: 2 layers, 64 FFN + 32 zero experts, top-12; one
                   prefill of its default batch (4 x 128 tokens) is ~70 ms on one core
    medium         live profiling on one GPU: small's routing at hidden 2048 (~1.2 B
                   parameters); GPU-bound from a few thousand tokens per step
    longcat-flash  the official LongCat-Flash configuration (560B total)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration that cannot describe a LongCat-Flash model; the message names the field."""


@dataclass
class LongcatConfig:
    # model
    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28  # each layer holds 2 attention blocks, 2 dense MLPs and 1 MoE
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    hidden_act: Literal["silu"] = "silu"

    # attention (MLA)
    num_attention_heads: int = 64
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_scale_q_lora: bool = True  # q_nope, q_rope *= sqrt(hidden / q_lora_rank)
    mla_scale_kv_lora: bool = True  # normed c_kv *= sqrt(hidden / kv_lora_rank)
    rope_theta: float = 10_000_000.0
    attention_bias: bool = False

    # dense FFN (the two SwiGLU `mlps` of every layer)
    ffn_hidden_size: int = 12288

    # MoE (FFN experts)
    n_routed_experts: int = 512
    expert_ffn_hidden_size: int = 2048
    moe_topk: int = 12  # chosen among FFN + zero experts

    # zero-computation experts
    zero_expert_num: int = 256  # 0 = a plain top-k MoE
    zero_expert_type: Literal["identity"] = "identity"

    # router
    routed_scaling_factor: float = 6.0

    # variant switches
    shortcut: bool = True  # True: ScMoE layer; False: MoE after attention 1, in sequence

    # default profiling shape (one step = default_batch_size sequences of default_seq_len)
    default_batch_size: int = 1
    default_seq_len: int = 4096

    def __post_init__(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_layers", "max_position_embeddings",
            "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size", "n_routed_experts",
            "expert_ffn_hidden_size", "moe_topk", "default_batch_size", "default_seq_len",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name}: must be positive, got {value}")
        if isinstance(self.zero_expert_num, bool) or not isinstance(self.zero_expert_num, int):
            raise ConfigError(f"zero_expert_num: expected an integer, got {self.zero_expert_num!r}")
        if self.zero_expert_num < 0:
            raise ConfigError(f"zero_expert_num: must be >= 0, got {self.zero_expert_num}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"qk_rope_head_dim: RoPE rotates pairs, so it must be even, got {self.qk_rope_head_dim}"
            )
        n_experts = self.n_routed_experts + self.zero_expert_num
        if self.moe_topk > n_experts:
            raise ConfigError(
                f"moe_topk: {self.moe_topk} exceeds the {n_experts} experts "
                f"(n_routed_experts {self.n_routed_experts} + zero_expert_num {self.zero_expert_num})"
            )
        for name in ["rms_norm_eps", "initializer_range", "rope_theta", "routed_scaling_factor"]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}: must be a positive number, got {value!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.zero_expert_type != "identity":
            raise ConfigError(
                f"zero_expert_type: only 'identity' is supported, got {self.zero_expert_type!r}"
            )
        for name in ["mla_scale_q_lora", "mla_scale_kv_lora", "attention_bias", "shortcut"]:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true/false, got {getattr(self, name)!r}")

    # ----------------------------------------------------------------- derived sizes
    @property
    def n_experts_total(self) -> int:
        """FFN experts + zero experts: the router's output width."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_attention_blocks(self) -> int:
        """Attention sublayers (= KV-cache slots): 2 per layer."""
        return 2 * self.num_layers

    # ----------------------------------------------------------------- constructors
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LongcatConfig":
        """A named preset (see the module docstring), optionally with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "LongcatConfig":
        """Strict: every key must be a field of LongcatConfig."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "LongcatConfig":
        """Read an official / transformers `config.json` (a path or the parsed dict).

        Keys that are not ours (model_type, torch_dtype, token ids, MTP settings...) are
        ignored; transformers' aliases (num_local_experts, num_experts_per_tok,
        intermediate_size, moe_intermediate_size) and `rope_parameters.rope_theta` are
        understood. A rope scaling other than the default is refused: we do not model it.
        """
        if isinstance(path_or_dict, dict):
            raw, source = dict(path_or_dict), "config dict"
        else:
            source = os.fspath(path_or_dict)
            if os.path.isdir(source):
                source = os.path.join(source, "config.json")
            try:
                with open(source, encoding="utf-8") as f:
                    raw = json.load(f)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{source}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields, got {type(raw).__name__}")
        aliases = {
            "num_local_experts": "n_routed_experts",
            "num_experts_per_tok": "moe_topk",
            "intermediate_size": "ffn_hidden_size",
            "moe_intermediate_size": "expert_ffn_hidden_size",
        }
        for alias, name in aliases.items():
            if alias in raw and name not in raw:
                raw[name] = raw[alias]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if isinstance(rope, dict):
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise ConfigError(f"{source}: rope scaling {rope!r} is not supported")
            if "rope_theta" in rope and "rope_theta" not in raw:
                raw["rope_theta"] = rope["rope_theta"]
        if raw.get("zero_expert_num") is None and "zero_expert_num" in raw:
            raw["zero_expert_num"] = 0
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "rope_theta" in values:
            values["rope_theta"] = float(values["rope_theta"])
        if "routed_scaling_factor" in values:
            values["routed_scaling_factor"] = float(values["routed_scaling_factor"])
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; also written (atomically) to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "LongcatConfig":
        """Inverse of `to_json`: JSON text, or a path to a file holding it."""
        text = os.fspath(text_or_path)
        source = "config JSON"
        if not text.lstrip().startswith("{"):
            source = text
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: not valid JSON ({err})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields")
        return cls.from_dict(values, source=source)

    def to_hf_dict(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `LongcatFlashConfig` describing the same model.

        `head_dim` is set to qk_rope_head_dim: transformers sizes its RoPE from head_dim.
        """
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range, hidden_act=self.hidden_act,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
            q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
            head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_bias=self.attention_bias, ffn_hidden_size=self.ffn_hidden_size,
            n_routed_experts=self.n_routed_experts, expert_ffn_hidden_size=self.expert_ffn_hidden_size,
            moe_topk=self.moe_topk, zero_expert_num=self.zero_expert_num,
            routed_scaling_factor=self.routed_scaling_factor, tie_word_embeddings=False,
        )


PRESETS: dict[str, dict[str, Any]] = {
    # The known-good tiny config of transformers' own LongCat test suite.
    "tiny": dict(
        vocab_size=99, hidden_size=144, num_layers=1, max_position_embeddings=512,
        num_attention_heads=8, q_lora_rank=48, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, ffn_hidden_size=288, n_routed_experts=4,
        expert_ffn_hidden_size=48, moe_topk=2, zero_expert_num=2, routed_scaling_factor=1.0,
        default_batch_size=2, default_seq_len=16,
    ),
    # Live CPU profiling. Routing mirrors the real model: FFN and zero experts 2:1, top-12,
    # so uniform routing uses 8 FFN experts per token (LongCat's reported mean); 64 FFN
    # experts get ~64 rows each from the default batch. Widths are what one core runs fast.
    "small": dict(
        vocab_size=4096, hidden_size=256, num_layers=2, max_position_embeddings=4096,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, ffn_hidden_size=512, n_routed_experts=64,
        expert_ffn_hidden_size=128, moe_topk=12, zero_expert_num=32, routed_scaling_factor=6.0,
        default_batch_size=4, default_seq_len=128,
    ),
    # One-GPU profiling: small's routing (64 FFN + 32 zero experts, top-12) at widths where
    # kernels, not launches, set the step once a step holds a few thousand tokens (~1.2 B
    # parameters, 4.7 GB in float32).
    "medium": dict(
        vocab_size=32768, hidden_size=2048, num_layers=2, max_position_embeddings=8192,
        num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, ffn_hidden_size=8192, n_routed_experts=64,
        expert_ffn_hidden_size=1024, moe_topk=12, zero_expert_num=32, routed_scaling_factor=6.0,
        default_batch_size=4, default_seq_len=512,
    ),
    # The official configuration (meituan-longcat/LongCat-Flash-Chat config.json).
    "longcat-flash": dict(
        vocab_size=131072, hidden_size=6144, num_layers=28, max_position_embeddings=131072,
        rms_norm_eps=1e-5, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mla_scale_q_lora=True,
        mla_scale_kv_lora=True, rope_theta=10_000_000.0, attention_bias=False,
        ffn_hidden_size=12288, n_routed_experts=512, expert_ffn_hidden_size=2048, moe_topk=12,
        zero_expert_num=256, zero_expert_type="identity", routed_scaling_factor=6.0,
        default_batch_size=1, default_seq_len=4096,
    ),
}
