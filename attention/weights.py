"""Attention-side weights of a model: everything but the routed experts.

Read tensor by tensor from the checkpoint with their expected shapes; no
routed-expert tensor is ever read here (the expert shards hold those).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeyard.model.amx import AmxLinear
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.cpu_matmul import Weight, pack
from moeyard.model.spec import ModelSpec
from moeyard.model.weight_names import (
    FFNNames,
    correction_bias_name,
    dense_mlp_names,
    layer_prefix,
    router_weight_name,
    shared_expert_gate_name,
    shared_expert_names,
)


@dataclass
class FFNWeights:
    gate: Weight  # [I, D]
    up: Weight    # [I, D]
    down: Weight  # [D, I]


@dataclass
class GQAWeights:
    q: Weight | None   # [H*hd, D]  (None once fused into qkv)
    k: Weight | None   # [KV*hd, D]
    v: Weight | None   # [KV*hd, D]
    o: Weight          # [D, H*hd]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [hd] per head, or [H*hd] full
    k_norm: torch.Tensor | None = None
    qkv: Weight | None = None
    """``[(H + 2 KV) hd, D]``: q, k and v stacked in one weight (the AMX kernel: one call instead of three,
    each a short call dominated by its fixed cost); then ``q``, ``k`` and ``v`` are None."""


@dataclass
class MLAWeights:
    q_proj: Weight | None              # [H*qk, D] when q_lora_rank is None
    q_a: Weight | None                 # [q_lora, D]
    q_a_norm: torch.Tensor | None      # [q_lora]
    q_b: Weight | None                 # [H*qk, q_lora]
    kv_a: Weight                       # [kv_lora + rope, D]
    kv_a_norm: torch.Tensor            # [kv_lora]
    kv_b: torch.Tensor                 # [H*(nope+v), kv_lora]
    o: Weight                          # [D, H*v]
    kv_b_k: torch.Tensor | None = None  # [H, nope, kv_lora]: kv_b's key rows per head (absorbed into the query)
    kv_b_v: torch.Tensor | None = None  # [H, kv_lora, v]: kv_b's value rows per head, transposed (absorbed into o)
    q_a_bias: torch.Tensor | None = None
    kv_a_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass
class MoEGateWeights:
    router: torch.Tensor                       # [E, D]
    correction_bias: torch.Tensor | None       # [E] (DeepSeek-V3)
    shared: FFNWeights | None                  # shared expert(s)
    shared_gate: torch.Tensor | None           # [1, D] (Qwen2-MoE)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: GQAWeights | MLAWeights
    mlp: FFNWeights | None          # dense layers
    moe: MoEGateWeights | None      # MoE layers (routed experts live on shards)


@dataclass
class AttentionModelWeights:
    embed: torch.Tensor    # [V, D]
    final_norm: torch.Tensor
    lm_head: Weight  # [V, D]
    layers: list[LayerWeights]


class _OnDevice:
    """A checkpoint reader whose tensors land on ``device`` (one copy each, cast on the way)."""

    def __init__(self, reader: CheckpointReader, device: torch.device):
        self.reader, self.device = reader, device

    def get(self, name, expected_shape=None, dtype=None) -> torch.Tensor:
        return self.reader.get(name, expected_shape, dtype).to(self.device)

    def has(self, name: str) -> bool:
        return self.reader.has(name)


def _ffn(reader: _OnDevice, names: FFNNames, d: int, inter: int, dtype) -> FFNWeights:
    return FFNWeights(reader.get(names.gate, (inter, d), dtype), reader.get(names.up, (inter, d), dtype),
                      reader.get(names.down, (d, inter), dtype))


def _gqa(reader: _OnDevice, spec: ModelSpec, layer: int, dtype) -> GQAWeights:
    p = f"{layer_prefix(layer)}.self_attn"
    d, hd, h, kv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    w = GQAWeights(q=reader.get(f"{p}.q_proj.weight", (h * hd, d), dtype),
                   k=reader.get(f"{p}.k_proj.weight", (kv * hd, d), dtype),
                   v=reader.get(f"{p}.v_proj.weight", (kv * hd, d), dtype),
                   o=reader.get(f"{p}.o_proj.weight", (d, h * hd), dtype))
    if spec.qkv_bias:
        w.q_bias = reader.get(f"{p}.q_proj.bias", (h * hd,), dtype)
        w.k_bias = reader.get(f"{p}.k_proj.bias", (kv * hd,), dtype)
        w.v_bias = reader.get(f"{p}.v_proj.bias", (kv * hd,), dtype)
    if spec.o_bias:
        w.o_bias = reader.get(f"{p}.o_proj.bias", (d,), dtype)
    if spec.qk_norm == "per_head":
        w.q_norm = reader.get(f"{p}.q_norm.weight", (hd,), dtype)
        w.k_norm = reader.get(f"{p}.k_norm.weight", (hd,), dtype)
    elif spec.qk_norm == "full":
        w.q_norm = reader.get(f"{p}.q_norm.weight", (h * hd,), dtype)
        w.k_norm = reader.get(f"{p}.k_norm.weight", (kv * hd,), dtype)
    return w


def _mla(reader: _OnDevice, spec: ModelSpec, layer: int, dtype) -> MLAWeights:
    m = spec.mla
    assert m is not None
    p = f"{layer_prefix(layer)}.self_attn"
    d, h = spec.hidden_size, spec.num_heads
    bias = spec.qkv_bias
    if m.q_lora_rank:
        q_proj = None
        q_a = reader.get(f"{p}.q_a_proj.weight", (m.q_lora_rank, d), dtype)
        q_a_norm = reader.get(f"{p}.q_a_layernorm.weight", (m.q_lora_rank,), dtype)
        q_b = reader.get(f"{p}.q_b_proj.weight", (h * m.qk_head_dim, m.q_lora_rank), dtype)
    else:
        q_proj = reader.get(f"{p}.q_proj.weight", (h * m.qk_head_dim, d), dtype)
        q_a = q_a_norm = q_b = None
    kv_b = reader.get(f"{p}.kv_b_proj.weight", (h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank), dtype)
    per_head = kv_b.view(h, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    return MLAWeights(
        q_proj=q_proj, q_a=q_a, q_a_norm=q_a_norm, q_b=q_b,
        kv_a=reader.get(f"{p}.kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.qk_rope_head_dim, d), dtype),
        kv_a_norm=reader.get(f"{p}.kv_a_layernorm.weight", (m.kv_lora_rank,), dtype),
        kv_b=kv_b,
        kv_b_k=per_head[:, :m.qk_nope_head_dim].contiguous(),
        kv_b_v=per_head[:, m.qk_nope_head_dim:].transpose(1, 2).contiguous(),
        o=reader.get(f"{p}.o_proj.weight", (d, h * m.v_head_dim), dtype),
        q_a_bias=reader.get(f"{p}.q_a_proj.bias", (m.q_lora_rank,), dtype) if bias and m.q_lora_rank else None,
        kv_a_bias=reader.get(f"{p}.kv_a_proj_with_mqa.bias", (m.kv_lora_rank + m.qk_rope_head_dim,), dtype)
        if bias else None,
        o_bias=reader.get(f"{p}.o_proj.bias", (d,), dtype) if spec.o_bias else None,
    )


def load_attention_weights(reader: CheckpointReader, spec: ModelSpec, dtype: torch.dtype,
                           device: torch.device | str = "cpu") -> AttentionModelWeights:
    """Every attention-side tensor of the checkpoint (no routed expert), in ``dtype`` on ``device``."""
    reader = _OnDevice(reader, torch.device(device))
    d, v = spec.hidden_size, spec.vocab_size
    layers = []
    for layer in range(spec.num_layers):
        p = layer_prefix(layer)
        attn = _mla(reader, spec, layer, dtype) if spec.mla else _gqa(reader, spec, layer, dtype)
        mlp = moe = None
        if spec.moe is not None and layer in spec.moe_layers:
            m = spec.moe
            shared = None
            if m.shared_intermediate_size:
                shared = _ffn(reader, shared_expert_names(spec.family, layer), d, m.shared_intermediate_size, dtype)
            bias = (reader.get(correction_bias_name(spec.family, layer), (m.num_experts,), torch.float32)
                    if m.has_correction_bias else None)
            moe = MoEGateWeights(
                router=reader.get(router_weight_name(spec.family, layer), (m.num_experts, d), dtype),
                correction_bias=bias, shared=shared,
                shared_gate=(reader.get(shared_expert_gate_name(layer), (1, d), dtype)
                             if m.shared_expert_gated else None))
        else:
            mlp = _ffn(reader, dense_mlp_names(layer), d, spec.dense_intermediate_size, dtype)
        layers.append(LayerWeights(
            input_norm=reader.get(f"{p}.input_layernorm.weight", (d,), dtype),
            post_norm=reader.get(f"{p}.post_attention_layernorm.weight", (d,), dtype),
            attn=attn, mlp=mlp, moe=moe))
    embed = reader.get("model.embed_tokens.weight", (v, d), dtype)
    if spec.tie_word_embeddings and not reader.has("lm_head.weight"):
        lm_head = embed
    else:
        lm_head = reader.get("lm_head.weight", (v, d), dtype)
    return AttentionModelWeights(embed=embed, final_norm=reader.get("model.norm.weight", (d,), dtype),
                                 lm_head=lm_head, layers=layers)


def pack_linears(weights: AttentionModelWeights, kernel: str) -> AttentionModelWeights:
    """Every projection the decode step multiplies by (attention, dense and shared-expert MLPs, the LM
    head) as ``kernel`` (:func:`~moeyard.model.cpu_matmul.resolve_matmul`) runs it: in the AMX kernel's
    tile order or prepacked for oneDNN in place of the plain tensor, or left as it is. The embedding (a
    lookup), norms, biases, routers and MLA's ``kv_b`` (read per head by the absorbed path, whole only by
    the reference path) stay plain.
    A tied LM head gets its own packed copy; the embedding stays the lookup table."""
    if kernel == "plain":
        return weights
    for lw in weights.layers:
        a = lw.attn
        if isinstance(a, GQAWeights):
            qkv = torch.cat([a.q, a.k, a.v]) if kernel == "amx" else None
            if qkv is not None and isinstance(fused := pack(qkv, kernel), AmxLinear):
                a.qkv, a.q, a.k, a.v = fused, None, None, None
            else:
                a.q, a.k, a.v = pack(a.q, kernel), pack(a.k, kernel), pack(a.v, kernel)
            a.o = pack(a.o, kernel)
        else:
            a.q_proj, a.q_a, a.q_b = pack(a.q_proj, kernel), pack(a.q_a, kernel), pack(a.q_b, kernel)
            a.kv_a, a.o = pack(a.kv_a, kernel), pack(a.o, kernel)
        for ffn in (lw.mlp, lw.moe.shared if lw.moe else None):
            if ffn is not None:
                ffn.gate, ffn.up, ffn.down = pack(ffn.gate, kernel), pack(ffn.up, kernel), pack(ffn.down, kernel)
    weights.lm_head = pack(weights.lm_head, kernel)
    return weights
