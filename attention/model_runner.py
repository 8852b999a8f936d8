"""The attention side of the model: embeddings, attention, norms, dense MLPs,
shared experts and the LM head; routed experts go through the router."""

from __future__ import annotations

import functools

import torch

from moeyard.attention.attn_meta import AttnMeta
from moeyard.attention.kv_cache import KVCache
from moeyard.attention.layers import gqa_attention, mla_attention, rms_norm
from moeyard.attention.paged import resolve_attention
from moeyard.attention.rope import RotaryEmbedding
from moeyard.attention.weights import AttentionModelWeights, FFNWeights
from moeyard.model.ffn import linear_rows, swiglu
from moeyard.model.spec import ModelSpec
from moeyard.router_service.moe_router import MoERouter
from moeyard.router_service.placement import ExpertsUnavailable


def _mlp(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    return swiglu(x, w.gate, w.up, w.down)


class ModelRunner:
    def __init__(self, spec: ModelSpec, weights: AttentionModelWeights, cache: KVCache,
                 router: MoERouter | None, dtype: torch.dtype, max_positions: int,
                 device: torch.device | str = "cpu", attention_backend: str = "auto"):
        self.spec = spec
        self.w = weights
        self.cache = cache
        self.router = router
        self.dtype = dtype
        rot_dim = spec.mla.qk_rope_head_dim if spec.mla else spec.head_dim
        self.rope = RotaryEmbedding(spec.rope, rot_dim, max_positions, dtype, device)
        attend, absorb = resolve_attention(attention_backend, device)
        self.attend = attend
        self._attn = (functools.partial(mla_attention, attend=attend, absorb=absorb) if spec.mla
                      else functools.partial(gqa_attention, attend=attend))
        self._moe_index = {layer: i for i, layer in enumerate(spec.moe_layers)}

    def _submit_ffn(self, layer: int, x: torch.Tensor):
        """Start the feed-forward of one layer. Dense layers finish at once; MoE
        layers send their routed work and return the pending handle."""
        lw = self.w.layers[layer]
        if lw.moe is None:
            return _mlp(x, lw.mlp)
        return self.router.submit(self._moe_index[layer], x)

    def _finish_ffn(self, layer: int, x: torch.Tensor, started) -> torch.Tensor:
        lw = self.w.layers[layer]
        if lw.moe is None:
            return started
        shared = None
        if lw.moe.shared is not None:  # computed while the routed experts are away
            shared = _mlp(x, lw.moe.shared)
            if lw.moe.shared_gate is not None:
                shared = torch.sigmoid(linear_rows(x, lw.moe.shared_gate)) * shared
        out = self.router.finish(started)
        return out if shared is None else out + shared

    def _attention(self, layer: int, h: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        lw = self.w.layers[layer]
        x = rms_norm(h, lw.input_norm, self.spec.rms_norm_eps)
        return h + self._attn(x, lw.attn, self.spec, layer, self.cache, self.rope, meta)

    def _logits(self, h: torch.Tensor, sample_rows: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h[sample_rows], self.w.final_norm, self.spec.rms_norm_eps)
        return linear_rows(h, self.w.lm_head).float()

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
        return self.forward_microbatches([(input_ids, meta, sample_rows)])

    @torch.inference_mode()
    def forward_microbatches(self, mbs: list[tuple[torch.Tensor, AttnMeta, torch.Tensor]]) -> torch.Tensor:
        """Run a step split into micro-batches (disjoint sets of sequences).

        Ping-pong: while micro-batch ``i``'s routed experts are at the shards,
        the next micro-batch runs its attention (and ``i``'s shared expert), as
        in MegaScale-Infer. With one micro-batch this is the plain forward.
        Returns the logits of every micro-batch's sample rows, concatenated.
        """
        eps = self.spec.rms_norm_eps
        hs = [self.w.embed[ids] for ids, _, _ in mbs]
        pending: list[tuple[int, torch.Tensor, object] | None] = [None] * len(mbs)
        i = 0
        try:
            for layer, lw in enumerate(self.w.layers):
                for i, (_, meta, _) in enumerate(mbs):
                    if pending[i] is not None:
                        pl, px, started = pending[i]
                        hs[i] = hs[i] + self._finish_ffn(pl, px, started)
                        pending[i] = None
                    hs[i] = self._attention(layer, hs[i], meta)
                    x = rms_norm(hs[i], lw.post_norm, eps)
                    pending[i] = (layer, x, self._submit_ffn(layer, x))
            out = []
            for i, (_, _, rows) in enumerate(mbs):
                pl, px, started = pending[i]
                hs[i] = hs[i] + self._finish_ffn(pl, px, started)
                out.append(self._logits(hs[i], rows))
        except ExpertsUnavailable as e:
            e.microbatch = i  # which micro-batch's rows ``e.rows`` refers to
            raise
        return out[0] if len(out) == 1 else torch.cat(out, dim=0)
