"""Attention-side layer math: RMSNorm, GQA and MLA attention over the paged cache.

Functions take plain weight dataclasses and tensors; shapes: ``T`` tokens in
the step, ``B`` sequences, ``Q``/``C`` the longest query/context of the step.
The attention itself is an :data:`~moeyard.attention.paged.AttendFn` kernel the caller chooses.
"""

from __future__ import annotations

import torch

from moeyard.attention.attn_meta import AttnMeta
from moeyard.attention.kv_cache import KVCache
from moeyard.attention.paged import AttendFn, attend_dense, dense_context, paged_attention
from moeyard.attention.rope import RotaryEmbedding, yarn_mscale
from moeyard.attention.weights import GQAWeights, MLAWeights
from moeyard.model.batch_invariant import bmm_rows
from moeyard.model.ffn import linear_rows
from moeyard.model.spec import ModelSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., D]`` normalised in fp32, scaled by ``weight [D]`` in ``x``'s dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gqa_attention(x: torch.Tensor, w: GQAWeights, spec: ModelSpec, layer: int, cache: KVCache,
                  rope: RotaryEmbedding, meta: AttnMeta, attend: AttendFn = paged_attention) -> torch.Tensor:
    """Grouped-query attention: ``x [T, D]`` -> ``[T, D]``; writes K/V of new tokens."""
    t = x.shape[0]
    h, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if w.qkv is not None:
        q, k, v = linear_rows(x, w.qkv).split([h * hd, kv * hd, kv * hd], dim=-1)
        q = q if w.q_bias is None else q + w.q_bias
        k = k if w.k_bias is None else k + w.k_bias
        v = v if w.v_bias is None else v + w.v_bias
    else:
        q = linear_rows(x, w.q, w.q_bias)
        k = linear_rows(x, w.k, w.k_bias)
        v = linear_rows(x, w.v, w.v_bias)
    if spec.qk_norm == "full":
        q = rms_norm(q, w.q_norm, spec.rms_norm_eps)
        k = rms_norm(k, w.k_norm, spec.rms_norm_eps)
    if spec.clip_qkv is not None:
        c = spec.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    q, k, v = q.view(t, h, hd), k.view(t, kv, hd), v.view(t, kv, hd)
    if spec.qk_norm == "per_head":
        q = rms_norm(q, w.q_norm, spec.rms_norm_eps)
        k = rms_norm(k, w.k_norm, spec.rms_norm_eps)
    q = rope.apply(q, meta.positions)
    k = rope.apply(k, meta.positions)
    kc, vc = cache.k[layer], cache.v[layer]
    kc[meta.slot_mapping] = k
    vc[meta.slot_mapping] = v
    out = attend(q, kc, vc, meta, hd ** -0.5, hd)
    return linear_rows(out.reshape(t, h * hd), w.o, w.o_bias)


def mla_softmax_scale(spec: ModelSpec) -> float:
    m, r = spec.mla, spec.rope
    scale = m.qk_head_dim ** -0.5
    if r.rope_type == "yarn" and r.mscale_all_dim:
        ms = yarn_mscale(r.factor, r.mscale_all_dim)
        scale = scale * ms * ms
    return scale


def mla_attention(x: torch.Tensor, w: MLAWeights, spec: ModelSpec, layer: int, cache: KVCache,
                  rope: RotaryEmbedding, meta: AttnMeta, attend: AttendFn = paged_attention,
                  absorb: bool = True) -> torch.Tensor:
    """DeepSeek multi-head latent attention: ``x [T, D]`` -> ``[T, D]``.

    The cache keeps the normalised latent ``c [r]`` (``r = kv_lora_rank``) and the rotated shared key
    ``k_pe [rope]`` per token. With ``absorb`` (the default) attention runs in the latent space: each
    head's query is projected into the latent through ``kv_b``'s key rows (``[T, H, r]``), scored
    against the cached latent and rope key as one shared KV head of width ``r + rope`` (MQA), the
    weighted latents (``[T, H, r]``) are projected through ``kv_b``'s value rows, then ``o``; nothing
    per context token is expanded. Without it (the reference), keys and values of every head are
    expanded from the latent for the whole context at each step.
    """
    m = spec.mla
    t, h = x.shape[0], spec.num_heads
    if w.q_proj is not None:
        q = linear_rows(x, w.q_proj)
    else:
        q = linear_rows(rms_norm(linear_rows(x, w.q_a, w.q_a_bias), w.q_a_norm, spec.rms_norm_eps), w.q_b)
    q = q.view(t, h, m.qk_head_dim)
    q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
    ckv = linear_rows(x, w.kv_a, w.kv_a_bias)
    c, k_pe = ckv.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
    c = rms_norm(c, w.kv_a_norm, spec.rms_norm_eps)
    q_pe = rope.apply(q_pe, meta.positions)
    k_pe = rope.apply(k_pe.unsqueeze(1), meta.positions).squeeze(1)
    lat = cache.latent[layer]
    lat[meta.slot_mapping] = torch.cat([c, k_pe], dim=-1)
    scale = mla_softmax_scale(spec)
    if absorb:
        q_lat = bmm_rows(q_nope.transpose(0, 1), w.kv_b_k)                  # [H, T, r]
        q_cat = torch.cat([q_lat.transpose(0, 1), q_pe], dim=-1)             # [T, H, r + rope]
        o_lat = attend(q_cat, lat.unsqueeze(1), None, meta, scale, m.kv_lora_rank)   # [T, H, r]
        out = bmm_rows(o_lat.transpose(0, 1), w.kv_b_v).transpose(0, 1)     # [T, H, v]
        return linear_rows(out.reshape(t, h * m.v_head_dim), w.o, w.o_bias)
    cache_slots, mask = dense_context(meta)
    ctx = lat[cache_slots]                                        # [B, C, r + rope]
    b, cl = ctx.shape[:2]
    kv = linear_rows(ctx[..., :m.kv_lora_rank].reshape(b * cl, -1), w.kv_b).view(
        b, cl, h, m.qk_nope_head_dim + m.v_head_dim)
    k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    k = torch.cat([k_nope, ctx[..., m.kv_lora_rank:].unsqueeze(2).expand(b, cl, h, m.qk_rope_head_dim)], dim=-1)
    out = attend_dense(torch.cat([q_nope, q_pe], dim=-1), k, v, meta, mask, scale)
    return linear_rows(out.reshape(t, h * m.v_head_dim), w.o, w.o_bias)
