"""What one attention call allocates: measured, not assumed.

torch's profiler records every CPU allocation and free of the call; replaying them in time order gives
the call's peak (``bench.common.peak_cpu_bytes``). A decode step of a DeepSeek-shaped model (MLA) no
longer allocates the keys and values expanded from the latent, and the paged kernel does not copy a
sequence's whole context."""

from __future__ import annotations

import torch

from bench.common import peak_cpu_bytes as peak_bytes
from bench.gpu_decode import DEEPSEEK_V3, MIXTRAL_8X7B, QUICK, _meta, build_slice
from moeyard.attention import paged
from moeyard.attention.layers import gqa_attention, mla_attention
from moeyard.attention.paged import gather_attention, paged_attention

BATCH = 8


def _slice(config: dict, context: int, **over):
    cfg = {**config, **QUICK[config["model_type"]], **over}
    s = build_slice(cfg, torch.device("cpu"), torch.float32, BATCH, context, block_size=16)
    x = torch.randn(BATCH, s.spec.hidden_size)
    return s, x, _meta(s, BATCH, context, "cpu")


def test_peak_measurement_sees_a_large_temporary():
    assert peak_bytes(lambda: torch.ones(1 << 20).sum()) >= 4 << 20


@torch.inference_mode()
def test_mla_decode_does_not_allocate_the_expanded_keys_and_values():
    # 32 heads: expanded, each token's K and V take 32 x (48 + 32) values against the latent's 64 + 16
    s, x, meta = _slice(DEEPSEEK_V3, 512, num_attention_heads=32, num_key_value_heads=32)
    m, h = s.spec.mla, s.spec.num_heads
    lw = s.runner.w.layers[0]
    expanded = BATCH * 513 * h * (m.qk_head_dim + m.v_head_dim) * 4   # K and V of every head, fp32

    def call(absorb: bool, attend=paged_attention):
        return lambda: mla_attention(x, lw.attn, s.spec, 0, s.cache, s.runner.rope, meta, attend, absorb)

    absorbed = peak_bytes(call(True))
    reference = peak_bytes(call(False, gather_attention))
    assert reference >= expanded, (reference, expanded)       # the reference does expand them
    assert absorbed < expanded / 8, (absorbed, expanded)
    torch.testing.assert_close(call(True)(), call(False, gather_attention)(), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_paged_decode_does_not_copy_whole_contexts():
    s, x, meta = _slice(MIXTRAL_8X7B, 4096)
    spec = s.spec
    lw = s.runner.w.layers[0]
    contexts = 2 * BATCH * 4097 * spec.num_kv_heads * spec.head_dim * 4  # K and V of every sequence, 16 MiB

    def call(attend):
        return lambda: gqa_attention(x, lw.attn, spec, 0, s.cache, s.runner.rope, meta, attend)

    assert peak_bytes(call(gather_attention)) >= contexts
    assert contexts >= 4 * paged.TILE_BYTES
    assert peak_bytes(call(paged_attention)) <= 2 * paged.TILE_BYTES   # one tile, its scores, the output
    torch.testing.assert_close(call(paged_attention)(), call(gather_attention)(), atol=1e-5, rtol=1e-5)
