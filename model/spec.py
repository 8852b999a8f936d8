"""Typed model specification read from a Hugging Face ``config.json``.

One :class:`ModelSpec` describes everything the attention side, the router and
the expert shards need to know about a checkpoint. It is built once, validated,
and shared (it is a frozen dataclass, cheap to pickle to Ray actors).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

SUPPORTED_FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "llama",
    "qwen2",
)

_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_SUPPORTED_ACTS = ("silu", "swish")


class SpecError(ValueError):
    """The checkpoint's config cannot be served; the message says why."""


Scoring = Literal["softmax", "sigmoid"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters (``rope_parameters`` / ``rope_scaling``)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    """YaRN: round the correction range to whole dimensions (transformers' ``truncate``)."""
    interleaved: bool = False
    """True when pairs are adjacent channels (DeepSeek's complex form), not halves."""


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek multi-head latent attention dimensions."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoESpec:
    """Routed experts of one model (identical for every MoE layer)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = False
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_logits_fp32: bool = False
    """DeepSeek-V2/V3 compute the router matmul in fp32; the others in the model dtype."""
    has_correction_bias: bool = False
    shared_intermediate_size: int = 0
    shared_expert_gated: bool = False
    """Qwen2-MoE scales the shared expert by ``sigmoid(shared_expert_gate(x))``."""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"
    clip_qkv: float | None = None
    mla: MLASpec | None = None
    moe: MoESpec | None = None
    moe_layers: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    source_config: dict = field(default_factory=dict, compare=False, repr=False)

    # -- derived -----------------------------------------------------------------
    @property
    def is_moe_layer(self) -> tuple[bool, ...]:
        s = set(self.moe_layers)
        return tuple(i in s for i in range(self.num_layers))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def moe_index(self, layer: int) -> int:
        """Index of decoder layer ``layer`` among the MoE layers (0..L-1)."""
        return self.moe_layers.index(layer)

    def total_and_active_params(self, top_k: int | None = None) -> tuple[int, int]:
        """(total, active per token) parameter counts, embeddings included; ``top_k``: experts per token
        served (default the checkpoint's)."""
        d = self.hidden_size
        if self.mla:
            m = self.mla
            q = (d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * self.num_heads * m.qk_head_dim
                 if m.q_lora_rank else d * self.num_heads * m.qk_head_dim)
            attn = (q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
                    + m.kv_lora_rank * self.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
                    + self.num_heads * m.v_head_dim * d)
        else:
            attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        total = active = self.num_layers * (attn + 2 * d)
        for layer in range(self.num_layers):
            if self.moe and layer in self.moe_layers:
                per_expert = 3 * d * self.moe.intermediate_size
                shared = 3 * d * self.moe.shared_intermediate_size
                total += self.moe.num_experts * per_expert + shared + d * self.moe.num_experts
                active += (top_k or self.moe.top_k) * per_expert + shared + d * self.moe.num_experts
            else:
                total += 3 * d * self.dense_intermediate_size
                active += 3 * d * self.dense_intermediate_size
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        return total + emb, active + emb


# -- parsing ---------------------------------------------------------------------

def _req(cfg: dict, *names: str):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    raise SpecError(f"config.json lacks required field {' / '.join(names)!r} for model_type {cfg.get('model_type')!r}")


def _opt(cfg: dict, name: str, default):
    v = cfg.get(name)
    return default if v is None else v


def _rope(cfg: dict, interleaved: bool) -> RopeSpec:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise SpecError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(_SUPPORTED_ROPE_TYPES)}")
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast", 32.0) or 32.0),
        beta_slow=float(params.get("beta_slow", 1.0) or 1.0),
        mscale=float(params.get("mscale", 1.0) or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim", 0.0) or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleaved=interleaved,
    )


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def spec_from_config(cfg: dict) -> ModelSpec:
    """Build and validate a :class:`ModelSpec` from a parsed ``config.json``."""
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise SpecError(
            f"unsupported model_type {family!r}; supported model types: {', '.join(SUPPORTED_FAMILIES)}"
        )
    qc = cfg.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else str(qc)
        raise SpecError(f"unsupported quantization_config (quant_method={method!r}); "
                        "moeyard serves unquantized bf16/fp32 checkpoints only")
    act = cfg.get("hidden_act", "silu")
    if act not in _SUPPORTED_ACTS:
        raise SpecError(f"unsupported hidden_act {act!r}; supported: {', '.join(_SUPPORTED_ACTS)}")

    hidden = int(_req(cfg, "hidden_size"))
    n_layers = int(_req(cfg, "num_hidden_layers"))
    n_heads = int(_req(cfg, "num_attention_heads"))
    n_kv = int(_opt(cfg, "num_key_value_heads", n_heads))
    head_dim = int(_opt(cfg, "head_dim", hidden // n_heads))
    if n_heads % n_kv:
        raise SpecError(f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    common = dict(
        family=family,
        vocab_size=int(_req(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        dense_intermediate_size=int(_opt(cfg, "intermediate_size", 0)),
        rms_norm_eps=float(_opt(cfg, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(_opt(cfg, "max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        torch_dtype=str(dtype),
        source_config=cfg,
    )
    moe: MoESpec | None = None
    moe_layers: tuple[int, ...] = ()
    extra: dict = {}

    if family == "mixtral":
        moe = MoESpec(num_experts=int(_req(cfg, "num_local_experts")), top_k=int(_req(cfg, "num_experts_per_tok")),
                      intermediate_size=int(_req(cfg, "intermediate_size")), norm_topk_prob=True)
        moe_layers = tuple(range(n_layers))
        extra["rope"] = _rope(cfg, False)
    elif family in ("qwen2_moe", "qwen3_moe"):
        n_exp = int(_req(cfg, "num_experts", "num_local_experts"))
        step = int(_opt(cfg, "decoder_sparse_step", 1))
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        shared = int(_opt(cfg, "shared_expert_intermediate_size", 0)) if family == "qwen2_moe" else 0
        moe = MoESpec(num_experts=n_exp, top_k=int(_req(cfg, "num_experts_per_tok")),
                      intermediate_size=int(_req(cfg, "moe_intermediate_size")),
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                      shared_intermediate_size=shared, shared_expert_gated=shared > 0)
        moe_layers = tuple(i for i in range(n_layers)
                           if i not in mlp_only and n_exp > 0 and (i + 1) % step == 0)
        if family == "qwen2_moe":
            extra["qkv_bias"] = bool(cfg.get("qkv_bias", True))
        else:
            extra["qkv_bias"] = bool(cfg.get("attention_bias", False))
            extra["o_bias"] = extra["qkv_bias"]
            extra["qk_norm"] = "per_head"
        extra["rope"] = _rope(cfg, False)
    elif family == "olmoe":
        moe = MoESpec(num_experts=int(_req(cfg, "num_experts")), top_k=int(_req(cfg, "num_experts_per_tok")),
                      intermediate_size=int(_req(cfg, "intermediate_size")),
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))
        moe_layers = tuple(range(n_layers))
        extra.update(qk_norm="full", clip_qkv=cfg.get("clip_qkv"), rope=_rope(cfg, False),
                     qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)))
    elif family in ("deepseek_v2", "deepseek_v3"):
        v3 = family == "deepseek_v3"
        n_exp = int(_req(cfg, "n_routed_experts"))
        first_dense = int(_opt(cfg, "first_k_dense_replace", 0))
        freq = int(_opt(cfg, "moe_layer_freq", 1))
        method = "noaux_tc" if v3 else str(_opt(cfg, "topk_method", "greedy"))
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise SpecError(f"unsupported topk_method {method!r}; supported: greedy, group_limited_greedy, noaux_tc")
        n_group = int(_opt(cfg, "n_group", 1))
        topk_group = int(_opt(cfg, "topk_group", 1))
        if method != "greedy" and n_exp % n_group:
            raise SpecError(f"n_routed_experts ({n_exp}) must be divisible by n_group ({n_group})")
        moe_inter = int(_req(cfg, "moe_intermediate_size"))
        moe = MoESpec(num_experts=n_exp, top_k=int(_req(cfg, "num_experts_per_tok")),
                      intermediate_size=moe_inter,
                      scoring="sigmoid" if v3 else "softmax",
                      # transformers' DeepSeek-V2 router never renormalises (released V2 configs say false)
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if v3 else False,
                      topk_method=method, n_group=n_group, topk_group=topk_group,
                      routed_scaling_factor=float(_opt(cfg, "routed_scaling_factor", 1.0)),
                      router_logits_fp32=True, has_correction_bias=v3,
                      shared_intermediate_size=moe_inter * int(_opt(cfg, "n_shared_experts", 0)))
        moe_layers = tuple(i for i in range(first_dense, n_layers) if (i - first_dense) % freq == 0) if n_exp else ()
        extra["mla"] = MLASpec(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=int(_req(cfg, "kv_lora_rank")),
                               qk_nope_head_dim=int(_req(cfg, "qk_nope_head_dim")),
                               qk_rope_head_dim=int(_req(cfg, "qk_rope_head_dim")),
                               v_head_dim=int(_req(cfg, "v_head_dim")))
        extra["rope"] = _rope(cfg, interleaved=(not v3) or bool(cfg.get("rope_interleave", True)))
        extra["qkv_bias"] = bool(cfg.get("attention_bias", False))
        extra["o_bias"] = extra["qkv_bias"]
    elif family in ("llama", "qwen2"):
        extra["rope"] = _rope(cfg, False)
        if family == "qwen2":
            extra["qkv_bias"] = True
        else:
            extra["qkv_bias"] = bool(cfg.get("attention_bias", False))
            extra["o_bias"] = extra["qkv_bias"]
    if family in ("qwen2_moe", "qwen2", "qwen3_moe") and cfg.get("use_sliding_window"):
        raise SpecError("use_sliding_window=true is not supported")

    spec = ModelSpec(moe=moe if moe_layers else None, moe_layers=moe_layers, **common, **extra)
    _validate(spec)
    return spec


def _validate(spec: ModelSpec) -> None:
    def positive(name: str, value: int) -> None:
        if value <= 0:
            raise SpecError(f"{name} must be positive, got {value}")

    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "max_position_embeddings"):
        positive(name, getattr(spec, name))
    if spec.moe:
        m = spec.moe
        positive("number of experts", m.num_experts)
        positive("expert intermediate size", m.intermediate_size)
        if not 1 <= m.top_k <= m.num_experts:
            raise SpecError(f"num_experts_per_tok ({m.top_k}) must be in [1, {m.num_experts}]")
        if m.topk_method != "greedy" and not 1 <= m.topk_group <= m.n_group:
            raise SpecError(f"topk_group ({m.topk_group}) must be in [1, n_group={m.n_group}]")
    if len(spec.moe_layers) < spec.num_layers:
        positive("intermediate_size (dense MLP layers)", spec.dense_intermediate_size)
    if spec.rope.rope_type == "yarn" and not math.isfinite(spec.rope.factor):
        raise SpecError("rope factor must be finite")


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read ``config.json`` from a checkpoint directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise SpecError(f"{path} not found: a checkpoint directory needs a config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{path} is not valid JSON: {e}") from e
    return spec_from_config(cfg)
