"""The Triton source of :mod:`moeyard.attention.paged_triton`'s kernel (imports Triton: load it only
through that module, which imports it at first use). See there for what it computes."""

import triton
import triton.language as tl


@triton.jit
def paged_attn(Q, K, V, O, BT, QS, QL, CL, scale,
               s_qt, s_qh, s_ks, s_kh, s_vs, s_vh, s_ot, s_oh, s_bt,
               G: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               D1: tl.constexpr, D1P: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr,
               DV: tl.constexpr, DVP: tl.constexpr,
               V_IS_K: tl.constexpr, PREC: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.program_id(2)
    q_len = tl.load(QL + seq)
    if mt * BLOCK_M < q_len * G:
        ctx = tl.load(CL + seq)
        q_start = tl.load(QS + seq)
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = rows // G
        heads = kvh * G + rows % G
        row_ok = qi < q_len
        qpos = ctx - q_len + qi
        q_rows = (q_start + qi).to(tl.int64) * s_qt + heads * s_qh
        d1 = tl.arange(0, D1P)
        q1 = tl.load(Q + q_rows[:, None] + d1[None, :], mask=row_ok[:, None] & (d1[None, :] < D1), other=0.0)
        if D2 > 0:
            d2 = tl.arange(0, D2P)
            q2 = tl.load(Q + q_rows[:, None] + D1 + d2[None, :], mask=row_ok[:, None] & (d2[None, :] < D2),
                         other=0.0)
        dv = tl.arange(0, DVP)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DVP], tl.float32)
        last_q = tl.minimum(mt * BLOCK_M + BLOCK_M, q_len * G) - 1
        kv_end = ctx - q_len + last_q // G + 1
        for start in range(0, kv_end, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)
            k_ok = kpos < kv_end
            blk = tl.load(BT + seq * s_bt + kpos // PAGE, mask=k_ok, other=0)
            slot = blk.to(tl.int64) * PAGE + kpos % PAGE
            k_rows = slot * s_ks + kvh * s_kh
            k1 = tl.load(K + k_rows[:, None] + d1[None, :], mask=k_ok[:, None] & (d1[None, :] < D1), other=0.0)
            s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
            if D2 > 0:
                k2 = tl.load(K + k_rows[:, None] + D1 + d2[None, :], mask=k_ok[:, None] & (d2[None, :] < D2),
                             other=0.0)
                s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
            s = s * scale
            s = tl.where((kpos[None, :] <= qpos[:, None]) & k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IS_K:
                v = k1
            else:
                v = tl.load(V + (slot * s_vs + kvh * s_vh)[:, None] + dv[None, :],
                            mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = (q_start + qi).to(tl.int64) * s_ot + heads * s_oh
        tl.store(O + o_rows[:, None] + dv[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))
