"""Attention-side layer math: RMSNorm, GQA and MLA attention over the paged cache.

Functions take plain weight dataclasses and tensors; shapes: ``T`` tokens in
the step, ``B`` sequences, ``Q``/``C`` the longest query/context of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeyard.attention.kv_cache import KVCache
from moeyard.attention.rope import RotaryEmbedding, yarn_mscale
from moeyard.attention.weights import GQAWeights, MLAWeights
from moeyard.model.ffn import linear_rows
from moeyard.model.spec import ModelSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., D]`` normalised in fp32, scaled by ``weight [D]`` in ``x``'s dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass
class AttnMeta:
    """Per-step indexing shared by every layer.

    ``positions [T]``, ``slot_mapping [T]`` (cache slot of each new token),
    ``tok_idx [B, Q]`` (row of ``T`` for each padded query), ``valid_q [B, Q]``,
    ``valid_rows [T]`` (the padded ``B * Q`` rows that hold a real query, in token order),
    ``cache_slots [B, C]`` (cache slot of each context position),
    ``mask [B, 1, Q, C]`` (causal and length mask).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    tok_idx: torch.Tensor
    valid_q: torch.Tensor
    valid_rows: torch.Tensor
    cache_slots: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def build(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> "AttnMeta":
        """The step's indexing, built on the host from its lists and copied to ``device`` without a host
        sync (every shape is known from the lists: nothing waits for the device)."""
        meta = AttnMeta._build_on_host(q_lens, ctx_lens, block_tables, block_size)
        if torch.device(device).type == "cpu":
            return meta
        return AttnMeta(*(getattr(meta, f).to(device, non_blocking=True) for f in AttnMeta.__dataclass_fields__))

    @staticmethod
    def _build_on_host(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
                       block_size: int) -> "AttnMeta":
        b = len(q_lens)
        i64 = dict(dtype=torch.int64, device="cpu")
        total, qmax, cmax = sum(q_lens), max(q_lens), max(ctx_lens)
        q_len_t = torch.tensor(q_lens, **i64)
        ctx_t = torch.tensor(ctx_lens, **i64)
        starts = torch.cumsum(q_len_t, 0) - q_len_t
        # positions of new tokens: ctx - q_len ... ctx - 1 per sequence
        seq_of_tok = torch.repeat_interleave(torch.arange(b, **i64), q_len_t, output_size=total)
        offs = torch.arange(total, **i64) - starts[seq_of_tok]
        positions = (ctx_t - q_len_t)[seq_of_tok] + offs
        max_blocks = max(len(t) for t in block_tables)
        bt = torch.tensor([list(t) + [0] * (max_blocks - len(t)) for t in block_tables], **i64)
        slot_mapping = bt[seq_of_tok, positions // block_size] * block_size + positions % block_size
        qi = torch.arange(qmax, **i64)
        valid_q = qi.unsqueeze(0) < q_len_t.unsqueeze(1)
        tok_idx = torch.where(valid_q, starts.unsqueeze(1) + qi, torch.zeros_like(qi))
        kp = torch.arange(cmax, **i64)
        cache_slots = torch.gather(bt, 1, (kp // block_size).clamp(max=max_blocks - 1).expand(b, -1)) * block_size \
            + kp % block_size
        qpos = (ctx_t - q_len_t).unsqueeze(1) + qi  # [B, Q]
        mask = (kp.view(1, 1, -1) <= qpos.unsqueeze(-1)) & (kp.view(1, 1, -1) < ctx_t.view(-1, 1, 1))
        valid_rows = torch.tensor([i * qmax + j for i, n in enumerate(q_lens) for j in range(n)], **i64)
        return AttnMeta(positions, slot_mapping, tok_idx, valid_q, valid_rows, cache_slots, mask.unsqueeze(1))


_SMALL_Q = 8


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float) -> torch.Tensor:
    """``q [T, H, dq]``, ``k [B, C, KV, dq]``, ``v [B, C, KV, dv]`` -> ``[T, H*dv]``.

    Decode-heavy steps (at most ``_SMALL_Q`` queries per sequence) use plain
    matmuls with the query heads of a KV group folded into rows (no K/V
    repetition, softmax in fp32); longer queries use torch's fused SDPA.
    """
    qp = q[meta.tok_idx]                             # [B, Q, H, dq]
    b, qn, h, dq = qp.shape
    kv, dv = k.shape[2], v.shape[-1]
    if qn <= _SMALL_Q:
        g = h // kv
        qg = qp.view(b, qn, kv, g, dq).permute(0, 2, 1, 3, 4).reshape(b, kv, qn * g, dq)
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale       # [B, KV, Q*G, C]
        mask = meta.mask.view(b, 1, qn, 1, -1).expand(b, 1, qn, g, -1).reshape(b, 1, qn * g, -1)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v.permute(0, 2, 1, 3))                        # [B, KV, Q*G, dv]
        out = out.view(b, kv, qn, g, dv).permute(0, 2, 1, 3, 4).reshape(b, qn, h, dv)
    else:
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=meta.mask, scale=scale, enable_gqa=kv != h)
        out = out.transpose(1, 2)                      # [B, Q, H, dv]
    # the real queries' rows by index, not by boolean mask (a mask's result size would need a host sync)
    return out.reshape(b * qn, -1).index_select(0, meta.valid_rows).reshape(q.shape[0], -1)


def gqa_attention(x: torch.Tensor, w: GQAWeights, spec: ModelSpec, layer: int, cache: KVCache,
                  rope: RotaryEmbedding, meta: AttnMeta) -> torch.Tensor:
    """Grouped-query attention: ``x [T, D]`` -> ``[T, D]``; writes K/V of new tokens."""
    t = x.shape[0]
    h, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
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
    out = _attend(q, kc[meta.cache_slots], vc[meta.cache_slots], meta, hd ** -0.5)
    return linear_rows(out, w.o, w.o_bias)


def mla_softmax_scale(spec: ModelSpec) -> float:
    m, r = spec.mla, spec.rope
    scale = m.qk_head_dim ** -0.5
    if r.rope_type == "yarn" and r.mscale_all_dim:
        ms = yarn_mscale(r.factor, r.mscale_all_dim)
        scale = scale * ms * ms
    return scale


def mla_attention(x: torch.Tensor, w: MLAWeights, spec: ModelSpec, layer: int, cache: KVCache,
                  rope: RotaryEmbedding, meta: AttnMeta) -> torch.Tensor:
    """DeepSeek multi-head latent attention: ``x [T, D]`` -> ``[T, D]``.

    The cache keeps the normalised latent ``c [kv_lora_rank]`` and the rotated
    shared key ``k_pe [qk_rope_head_dim]`` per token; keys and values of all
    heads are expanded from the latent at attention time.
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
    ctx = lat[meta.cache_slots]                                   # [B, C, r + rope]
    b, cl = ctx.shape[:2]
    kv = linear_rows(ctx[..., :m.kv_lora_rank], w.kv_b).view(b, cl, h, m.qk_nope_head_dim + m.v_head_dim)
    k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    k = torch.cat([k_nope, ctx[..., m.kv_lora_rank:].unsqueeze(2).expand(b, cl, h, m.qk_rope_head_dim)], dim=-1)
    out = _attend(torch.cat([q_nope, q_pe], dim=-1), k, v, meta, mla_softmax_scale(spec))
    return linear_rows(out, w.o, w.o_bias)
