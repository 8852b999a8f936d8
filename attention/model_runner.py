"""The attention side of the model: embeddings, attention, norms, dense MLPs,
shared experts and the LM head; routed experts go through the router."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.kv_cache import KVCache
from attention.layers import AttnMeta, gqa_attention, mla_attention, rms_norm
from attention.rope import RotaryEmbedding
from attention.weights import AttentionModelWeights, FFNWeights
from cluster.spec import ModelSpec
from expert_actors.expert_compute import swiglu
from router_service.moe_router import MoERouter


def _mlp(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    return swiglu(x, w.gate, w.up, w.down)


class ModelRunner:
    def __init__(self, spec: ModelSpec, weights: AttentionModelWeights, cache: KVCache,
                 router: MoERouter | None, dtype: torch.dtype, max_positions: int):
        self.spec = spec
        self.w = weights
        self.cache = cache
        self.router = router
        self.dtype = dtype
        rot_dim = spec.mla.qk_rope_head_dim if spec.mla else spec.head_dim
        self.rope = RotaryEmbedding(spec.rope, rot_dim, max_positions, dtype)
        self._attn = mla_attention if spec.mla else gqa_attention
        self._moe_index = {layer: i for i, layer in enumerate(spec.moe_layers)}

    def ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Post-attention feed-forward of one layer: ``x [T, D]`` -> ``[T, D]``."""
        lw = self.w.layers[layer]
        if lw.moe is None:
            return _mlp(x, lw.mlp)
        out = self.router(self._moe_index[layer], x)
        if lw.moe.shared is not None:
            s = _mlp(x, lw.moe.shared)
            if lw.moe.shared_gate is not None:
                s = torch.sigmoid(F.linear(x, lw.moe.shared_gate)) * s
            out = out + s
        return out

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMeta, sample_rows: torch.Tensor) -> torch.Tensor:
        """Run one step.

        Args:
            input_ids: ``[T]`` new tokens of every scheduled sequence, sequence by sequence.
            meta: positions, cache slots and masks of the step.
            sample_rows: ``[B']`` rows of ``T`` whose next-token logits are needed.
        Returns:
            ``[B', V]`` fp32 logits.
        """
        spec = self.spec
        h = self.w.embed[input_ids]
        for layer, lw in enumerate(self.w.layers):
            x = rms_norm(h, lw.input_norm, spec.rms_norm_eps)
            h = h + self._attn(x, lw.attn, spec, layer, self.cache, self.rope, meta)
            x = rms_norm(h, lw.post_norm, spec.rms_norm_eps)
            h = h + self.ffn(layer, x)
        h = rms_norm(h[sample_rows], self.w.final_norm, spec.rms_norm_eps)
        return F.linear(h, self.w.lm_head).float()
