"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Greedy rows take the argmax where the logits are. Rows that sample copy their logits to the host
and sample there with their request's CPU generator, so a seed gives the same tokens on any device.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from moeyard.attention.sequence import Sequence
from moeyard.model.devices import host_tensor_to


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside top-k / the top-p nucleus.

    ``logits [B, V]`` (already divided by temperature), ``top_k [B]`` (0 = off),
    ``top_p [B]`` in (0, 1]. Returns ``[B, V]`` with masked entries at -inf.
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).unsqueeze(1)
    drop = rank >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    cum_before = torch.cumsum(probs, dim=-1) - probs
    drop |= cum_before >= top_p.unsqueeze(1)   # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)


MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-7


def sample(logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
    """Pick the next token of each sequence from ``logits [B, V]`` (fp32, on any device)."""
    # max's indices: the first maximum (and the first NaN), as argmax, and cheaper on CPUs (docs/benchmarks.md)
    out = logits.max(dim=-1).indices.tolist()  # the step's one host sync
    rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rand:
        cpu = torch.device("cpu")
        sub = logits.index_select(0, host_tensor_to(rand, torch.int64, logits.device)).to(cpu)
        # a temperature or top_p that rounds to 0 in fp32 would turn the row into NaN: the limits
        # (greedy, top token only) are what such values mean
        temps = torch.tensor([seqs[i].params.temperature for i in rand], dtype=torch.float32, device=cpu)
        temps = temps.clamp_min(MIN_TEMPERATURE)
        top_k = torch.tensor([seqs[i].params.top_k for i in rand], dtype=torch.int64, device=cpu)
        top_p = torch.tensor([seqs[i].params.top_p for i in rand], dtype=torch.float32, device=cpu)
        scaled = _filter_top_k_top_p(sub / temps.unsqueeze(1), top_k, top_p.clamp_min(MIN_TOP_P))
        probs = torch.softmax(scaled, dim=-1)
        ok = (torch.isfinite(probs).all(dim=1) & (probs.sum(dim=1) > 0)).tolist()
        for j, i in enumerate(rand):
            if ok[j]:  # else (non-finite logits): the argmax, rather than failing the whole step
                out[i] = int(torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0])
    return out
