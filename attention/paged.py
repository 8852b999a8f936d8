"""Attention over the paged KV cache: the kernels every attention layer calls.

All share one signature, :data:`AttendFn`::

    attend(q [T, H, dq], k_cache [S, KV, dq], v_cache [S, KV, dv] | None, meta, scale, v_dim) -> [T, H, dv]

``k_cache``/``v_cache`` are a layer's flat caches (slot ``block * block_size + offset``); with
``v_cache=None`` the values are the first ``v_dim`` columns of the keys (MLA in the latent space, where
the cached latent is both). The query heads of one KV head are folded into rows (no K/V repetition) and
the softmax runs in fp32.

- :func:`paged_attention` (``paged``, the CPU default): reads the cache through the block tables a tile
  of blocks at a time with an online softmax (flash-decoding's recurrence), so no step ever holds a
  sequence's whole context: the only copy is the current tile, sized to stay near the caches
  (:data:`TILE_BYTES`), and the masks come from positions on the device, not from a dense mask built
  on the host. On CPUs each tile goes through torch's fused flash-attention kernel
  (:func:`_paged_flash_cpu`, decode steps with a KV head's query heads folded into rows); elsewhere
  through matmuls and the recurrence written out.
- :func:`gather_attention` (``gather``): the reference; gathers each sequence's whole context into
  ``[B, C, KV, d]`` and masks it densely (the engine's path before the paged kernels; tests compare
  the others with it).
- ``triton`` (:mod:`moeyard.attention.paged_triton`, the CUDA default): a Triton kernel that reads the
  block tables in place.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from moeyard.attention.attn_meta import AttnMeta
from moeyard.model import batch_invariant

AttendFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", AttnMeta, float, int], torch.Tensor]

TILE_BYTES = 4 << 20
"""Bytes of one tile of :func:`paged_attention`: its keys and values (or its fp32 scores and
probabilities, whichever is larger)."""

PREFILL_TILE_BYTES = 32 << 20
"""The same for steps with long queries on the CPU (:func:`_paged_flash_cpu`): a prefill chunk's compute
grows with its queries times its context while its tile grows with the context alone, so larger tiles
(fewer merges) pay there."""

_SMALL_Q = 8

INVARIANT_TILE_TOKENS = 256
"""Batch-invariant mode: keys per tile (every tile padded to it), so a sequence's context splits the same
way whatever the longest context of its step."""
INVARIANT_Q_ROWS = 32
"""Batch-invariant mode: query rows per kernel call (the flash kernel's own query block below 192 rows),
so a query row goes through calls of one shape whether it is decoded or part of any prefill chunk."""


def _fold_queries(q: torch.Tensor, meta: AttnMeta, kv: int) -> torch.Tensor:
    """``q [T, H, dq]`` -> ``[B, KV, Q*G, dq]``: padded per sequence, a KV head's query heads as rows."""
    qp = q[meta.tok_idx]                                   # [B, Q, H, dq]
    b, qn, h, dq = qp.shape
    return qp.view(b, qn, kv, h // kv, dq).permute(0, 2, 1, 3, 4).reshape(b, kv, qn * (h // kv), dq)


def _unfold_rows(out: torch.Tensor, meta: AttnMeta, h: int) -> torch.Tensor:
    """``[B, KV, Q*G, dv]`` -> ``[T, H, dv]``: the real queries' rows by index (a boolean mask's
    result size would need a host sync)."""
    b, kv, _, dv = out.shape
    qn = meta.max_q
    out = out.view(b, kv, qn, h // kv, dv).permute(0, 2, 1, 3, 4).reshape(b * qn, h, dv)
    return out.index_select(0, meta.valid_rows)


def _row_positions(meta: AttnMeta, g: int) -> torch.Tensor:
    """``[B, 1, Q*G, 1]``: the position of each folded query row."""
    b, qn = meta.qpos.shape
    return meta.qpos.view(b, 1, qn, 1).expand(b, 1, qn, g).reshape(b, 1, qn * g, 1)


def _tile(blocks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``blocks [NB, bs, ...]`` rows ``ids [B, nb]`` -> ``[B * nb, bs, ...]``: ``index_select`` copies whole
    block rows (several times faster on CPUs than advanced indexing's per-element gather)."""
    return blocks.index_select(0, ids.reshape(-1))


def tile_blocks(meta: AttnMeta, kv: int, dq: int, dv: int, rows: int, itemsize: int, tile_bytes: int) -> int:
    """Blocks per tile: as many as keep the tile's keys and values ``[B, n, KV, dq + dv]`` (``dv = 0``
    where the values are the keys' columns) and its fp32 scores and probabilities ``[B, KV, rows, n]``
    within ``tile_bytes`` (at least one)."""
    per_token = meta.num_seqs * kv * max((dq + dv) * itemsize, 2 * rows * 4)
    return max(1, tile_bytes // (per_token * meta.block_size))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, meta: AttnMeta,
                    scale: float, v_dim: int, tile_bytes: int | None = None) -> torch.Tensor:
    """Attention that reads ``k_cache``/``v_cache`` through the block tables, tile by tile, each within
    ``tile_bytes`` (:data:`TILE_BYTES` by default). ``[T, H, dv]``."""
    if meta.num_tokens == 0:
        return q.new_empty(0, q.shape[1], v_dim)
    if q.device.type == "cpu" and batch_invariant.enabled():
        return _paged_flash_cpu_invariant(q, k_cache, v_cache, meta, scale, v_dim)
    if q.device.type == "cpu":
        long_q = meta.max_q > _SMALL_Q
        return _paged_flash_cpu(q, k_cache, v_cache, meta, scale, v_dim,
                                tile_bytes or (PREFILL_TILE_BYTES if long_q else TILE_BYTES))
    return paged_recurrence(q, k_cache, v_cache, meta, scale, v_dim, tile_bytes)


def paged_recurrence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, meta: AttnMeta,
                     scale: float, v_dim: int, tile_bytes: int | None = None) -> torch.Tensor:
    """:func:`paged_attention` written out: each tile's scores by matmul with a KV head's query heads as
    rows, and flash-decoding's online-softmax recurrence across tiles (devices without a fused kernel
    for it). ``[T, H, dv]``."""
    h, dq = q.shape[1], q.shape[2]
    kv = k_cache.shape[1]
    g = h // kv
    b, bs = meta.num_seqs, meta.block_size
    if meta.num_tokens == 0:
        return q.new_empty(0, h, v_dim)
    qg = _fold_queries(q, meta, kv)                        # [B, KV, R, dq]
    rows = qg.shape[2]
    qrow = _row_positions(meta, g)                         # [B, 1, R, 1]
    ctx = meta.ctx_lens.view(b, 1, 1, 1)
    kblocks = k_cache.view(-1, bs, kv, dq)
    vblocks = None if v_cache is None else v_cache.view(-1, bs, kv, v_cache.shape[-1])
    n_blocks = -(-meta.max_ctx // bs)
    dv = 0 if v_cache is None else v_cache.shape[-1]
    step = tile_blocks(meta, kv, dq, dv, rows, k_cache.element_size(), tile_bytes or TILE_BYTES)
    kpos_all = torch.arange(min(step, n_blocks) * bs, device=q.device)
    m = l = acc = None
    for j0 in range(0, n_blocks, step):
        ids = meta.block_tables[:, j0:j0 + step]           # [B, nb]
        n = ids.shape[1] * bs
        kt = _tile(kblocks, ids).view(b, n, kv, dq)        # the tile: the only copy of the cache
        vt = kt[..., :v_dim] if vblocks is None else _tile(vblocks, ids).view(b, n, kv, -1)
        s = torch.matmul(qg, kt.permute(0, 2, 3, 1)).float() * scale      # [B, KV, R, n]
        kpos = kpos_all[:n] + j0 * bs
        s = s.masked_fill((kpos > qrow) | (kpos >= ctx), float("-inf"))
        if j0 == 0 and step >= n_blocks:                   # one tile: a plain softmax
            p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
            acc = torch.matmul(p.to(vt.dtype), vt.permute(0, 2, 1, 3))
            return _unfold_rows(acc, meta, h)
        m_tile = s.amax(-1, keepdim=True)
        m_new = m_tile if m is None else torch.maximum(m, m_tile)
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = torch.exp(s - m_safe)
        pv = torch.matmul(p.to(vt.dtype), vt.permute(0, 2, 1, 3)).float()   # [B, KV, R, dv]
        if m is None:
            l, acc = p.sum(-1, keepdim=True), pv
        else:
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + pv
        m = m_new
        del kt, vt, s, p, pv   # this tile's memory is free before the next one is read
    out = (acc / l.clamp_min(torch.finfo(torch.float32).tiny)).to(q.dtype)
    return _unfold_rows(out, meta, h)


def _paged_flash_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, meta: AttnMeta,
                     scale: float, v_dim: int, tile_bytes: int) -> torch.Tensor:
    """Attention on the CPU by torch's fused flash-attention kernel on each tile of blocks, which also
    returns each row's log-sum-exp, and the tiles merged by it (the flash-decoding merge), so scores are
    never materialised. ``[T, H, dv]``.

    Long queries (prefill chunks) run as ``[B, H, Q]`` rows, the kernel mapping query head ``h`` to key
    head ``h // G`` itself. Short ones (decode) fold a KV head's ``G`` query heads into its rows
    (``[B, KV, Q*G]``): the kernel then makes ``B * KV`` tasks of ``Q*G`` rows instead of ``B * H`` tasks
    of ``Q``, which is what its per-task cost needs at one query per sequence. Either way one mask row
    per query row, shared by the heads."""
    h, dq = q.shape[1], q.shape[2]
    kv = k_cache.shape[1]
    b, bs, qn = meta.num_seqs, meta.block_size, meta.max_q
    fold = qn <= _SMALL_Q
    if fold:
        qx = _fold_queries(q, meta, kv)                    # [B, KV, R, dq]
        rowpos = _row_positions(meta, h // kv)             # [B, 1, R, 1]
    else:
        qx = q[meta.tok_idx].transpose(1, 2)               # [B, H, Q, dq]
        rowpos = meta.qpos.view(b, 1, qn, 1)
    rows = qx.shape[2]
    ctx = meta.ctx_lens.view(b, 1, 1, 1)
    kblocks = k_cache.view(-1, bs, kv, dq)
    vblocks = None if v_cache is None else v_cache.view(-1, bs, kv, v_cache.shape[-1])
    dv = dq if v_cache is None else v_cache.shape[-1]
    per_token = b * kv * (dq + dv) * k_cache.element_size() + b * rows * q.element_size()   # K, V and the mask
    step = max(1, tile_bytes // (per_token * bs))
    n_blocks = -(-meta.max_ctx // bs)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    lse_all = acc = None
    for j0 in range(0, n_blocks, step):
        ids = meta.block_tables[:, j0:j0 + step]
        n = ids.shape[1] * bs
        kt = _tile(kblocks, ids).view(b, n, kv, dq).transpose(1, 2)     # [B, KV, n, dq]
        # the kernel wants one head size: MLA's values (the latent columns) ride along as the whole row
        vt = kt if vblocks is None else _tile(vblocks, ids).view(b, n, kv, -1).transpose(1, 2)
        kpos = torch.arange(j0 * bs, j0 * bs + n, device=q.device)
        allowed = (kpos <= rowpos) & (kpos < ctx)                        # [B, 1, rows, n]
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        out, lse = flash(qx, kt, vt, attn_mask=bias, scale=scale)       # [B, *, rows, dv'], [B, *, rows]
        out = out[..., :v_dim] if vblocks is None else out
        if j0 == 0 and step >= n_blocks:
            acc = out
            break
        # a row with no key in this tile gets lse 0 from the kernel: it must weigh nothing
        lse = lse.masked_fill(~allowed.any(-1), float("-inf")).unsqueeze(-1)
        if acc is None:
            lse_all, acc = lse, out.float()
        else:
            new = torch.logaddexp(lse_all, lse)
            safe = new.masked_fill(new == float("-inf"), 0.0)
            acc = acc * torch.exp(lse_all - safe) + out.float() * torch.exp(lse - safe)
            lse_all = new
        del kt, vt, bias, out
    if fold:
        return _unfold_rows(acc.to(q.dtype), meta, h)
    out = acc.to(q.dtype).transpose(1, 2).reshape(b * qn, h, v_dim)     # [B*Q, H, dv]
    return out.index_select(0, meta.valid_rows)


def _paged_flash_cpu_invariant(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                               meta: AttnMeta, scale: float, v_dim: int) -> torch.Tensor:
    """:func:`_paged_flash_cpu` in batch-invariant mode (:mod:`moeyard.model.batch_invariant`): every
    kernel call has :data:`INVARIANT_Q_ROWS` query rows per (sequence, head) and every tile exactly
    :data:`INVARIANT_TILE_TOKENS` keys (padded, masked), tiles at fixed positions merged in order, so a
    query row's sums run the same way whatever else shares its step and however its prompt was chunked.
    ``[T, H, dv]``."""
    h, dq = q.shape[1], q.shape[2]
    kv = k_cache.shape[1]
    b, bs, qn = meta.num_seqs, meta.block_size, meta.max_q
    per_tile = max(1, INVARIANT_TILE_TOKENS // bs)
    n = per_tile * bs
    n_blocks = -(-meta.max_ctx // bs)
    n_tiles = -(-n_blocks // per_tile)
    tables = meta.block_tables
    if tables.shape[1] < n_tiles * per_tile:       # pad with block 0: its keys are masked
        tables = torch.cat([tables, tables.new_zeros(b, n_tiles * per_tile - tables.shape[1])], dim=1)
    kblocks = k_cache.view(-1, bs, kv, dq)
    vblocks = None if v_cache is None else v_cache.view(-1, bs, kv, v_cache.shape[-1])
    ctx = meta.ctx_lens.view(b, 1, 1, 1)
    rq = INVARIANT_Q_ROWS
    qp = q[meta.tok_idx]                                   # [B, Q, H, dq]
    qpos = meta.qpos
    if qn % rq:                                            # pad the query rows (their results are dropped)
        qp = torch.cat([qp, qp.new_zeros(b, rq - qn % rq, h, dq)], dim=1)
        qpos = torch.cat([qpos, qpos.new_full((b, rq - qn % rq), -1)], dim=1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    chunks = range(0, qp.shape[1], rq)
    acc: list[torch.Tensor | None] = [None] * len(chunks)
    lse_all: list[torch.Tensor | None] = [None] * len(chunks)
    for t0 in range(n_tiles):                 # one tile in memory at a time, every query chunk against it
        ids = tables[:, t0 * per_tile:(t0 + 1) * per_tile]
        kt = _tile(kblocks, ids).view(b, n, kv, dq).transpose(1, 2)     # [B, KV, n, dq]
        vt = kt if vblocks is None else _tile(vblocks, ids).view(b, n, kv, -1).transpose(1, 2)
        kpos = torch.arange(t0 * n, (t0 + 1) * n, device=q.device)
        for c, r0 in enumerate(chunks):
            qx = qp[:, r0:r0 + rq].transpose(1, 2)                      # [B, H, rq, dq]
            allowed = (kpos <= qpos[:, r0:r0 + rq].view(b, 1, rq, 1)) & (kpos < ctx)   # [B, 1, rq, n]
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
            out, lse = flash(qx, kt, vt, attn_mask=bias, scale=scale)
            out = (out[..., :v_dim] if vblocks is None else out).float()
            lse = lse.masked_fill(~allowed.any(-1), float("-inf")).unsqueeze(-1)
            if acc[c] is None:
                lse_all[c], acc[c] = lse, out
            else:  # a tile a row has no key in adds exactly nothing (weight exp(-inf) = 0, its output 0)
                new = torch.logaddexp(lse_all[c], lse)
                safe = new.masked_fill(new == float("-inf"), 0.0)
                acc[c] = acc[c] * torch.exp(lse_all[c] - safe) + out * torch.exp(lse - safe)
                lse_all[c] = new
        del kt, vt
    outs = [a.to(q.dtype) for a in acc]
    out = torch.cat(outs, dim=2)[:, :, :qn]                            # [B, H, Q, dv]
    return out.transpose(1, 2).reshape(b * qn, h, v_dim).index_select(0, meta.valid_rows)


def dense_context(meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's indexing: ``cache_slots [B, C]`` of every context position and the causal and
    length ``mask [B, 1, Q, C]``."""
    bs, c = meta.block_size, meta.max_ctx
    kp = torch.arange(c, device=meta.block_tables.device)
    blk = (kp // bs).clamp(max=meta.block_tables.shape[1] - 1)
    cache_slots = meta.block_tables[:, blk] * bs + kp % bs
    mask = (kp.view(1, 1, -1) <= meta.qpos.unsqueeze(-1)) & (kp.view(1, 1, -1) < meta.ctx_lens.view(-1, 1, 1))
    return cache_slots, mask.unsqueeze(1)


def gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, meta: AttnMeta,
                     scale: float, v_dim: int) -> torch.Tensor:
    """The reference: each sequence's whole context gathered, masked densely. ``[T, H, dv]``."""
    cache_slots, mask = dense_context(meta)
    k = k_cache[cache_slots]                               # [B, C, KV, dq]
    v = k[..., :v_dim] if v_cache is None else v_cache[cache_slots]
    return attend_dense(q, k, v, meta, mask, scale)


def attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """``q [T, H, dq]`` against a gathered context ``k [B, C, KV, dq]``, ``v [B, C, KV, dv]`` under
    ``mask [B, 1, Q, C]`` -> ``[T, H, dv]``. Decode-heavy steps (at most 8 queries per sequence) use
    matmuls with a KV head's query heads as rows; longer queries torch's fused SDPA."""
    h = q.shape[1]
    b, qn = meta.num_seqs, meta.max_q
    kv, dv = k.shape[2], v.shape[-1]
    if meta.num_tokens == 0:
        return q.new_empty(0, h, dv)
    if qn <= _SMALL_Q:
        g = h // kv
        qg = _fold_queries(q, meta, kv)
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale       # [B, KV, Q*G, C]
        rows_mask = mask.view(b, 1, qn, 1, -1).expand(b, 1, qn, g, -1).reshape(b, 1, qn * g, -1)
        probs = torch.softmax(scores.masked_fill(~rows_mask, float("-inf")), dim=-1).nan_to_num_(0.0)
        return _unfold_rows(torch.matmul(probs.to(v.dtype), v.permute(0, 2, 1, 3)), meta, h)
    qp = q[meta.tok_idx]                                   # [B, Q, H, dq]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=kv != h)
    return out.transpose(1, 2).reshape(b * qn, h, dv).index_select(0, meta.valid_rows)


AttentionBackend = Literal["auto", "paged", "triton", "gather"]
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "paged", "triton", "gather")


def resolve_attention(backend: str, device: torch.device | str) -> tuple[AttendFn, bool]:
    """The kernel for ``backend`` on ``device``, and whether MLA runs absorbed (all but ``gather``,
    the reference, which also expands MLA's keys and values). ``auto``: ``triton`` on CUDA where
    Triton is installed, else ``paged``."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        cuda = torch.device(device).type == "cuda"
        backend = "triton" if cuda and importlib.util.find_spec("triton") is not None else "paged"
    if backend == "gather":
        return gather_attention, False
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("attention backend 'triton' needs the triton package, which is not installed")
        from moeyard.attention.paged_triton import triton_paged_attention
        return triton_paged_attention, True
    return paged_attention, True
