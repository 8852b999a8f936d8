"""The FFN inputs of a dense model on a text, per decoder layer: what ``moeyard upcycle --router kmeans``
fits its routers to."""

from __future__ import annotations

from pathlib import Path

import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams


def ffn_inputs(dense_dir: Path, token_ids: list[int], chunk: int = 256) -> list[torch.Tensor]:
    """Per decoder layer, the FFN inputs ``[N, D]`` (after the post-attention norm) of ``token_ids`` run
    through the dense model in chunks of ``chunk`` tokens (the in-process engine, fp32, CPU)."""
    engine = LLMEngine(dense_dir, EngineConfig(dtype="float32", device="cpu", max_num_batched_tokens=chunk,
                                               max_num_seqs=16))
    captured: list[list[torch.Tensor]] = [[] for _ in range(engine.spec.num_layers)]
    runner = engine.runner
    submit = runner._submit_ffn

    def recording(layer: int, x: torch.Tensor):
        captured[layer].append(x.detach().clone())
        return submit(layer, x)

    runner._submit_ffn = recording
    pieces = [token_ids[i:i + chunk] for i in range(0, len(token_ids), chunk) if len(token_ids[i:i + chunk]) > 1]
    engine.generate(pieces, SamplingParams(max_tokens=1, ignore_eos=True))
    return [torch.cat(xs) for xs in captured]
