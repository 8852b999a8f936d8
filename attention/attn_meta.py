"""The per-step indexing every attention layer shares (:class:`AttnMeta`).

Built once per engine step on the host, from the scheduler's lists, and copied to the
engine's device without a host sync. Shapes: ``T`` new tokens of the step, ``B`` sequences,
``Q`` the longest query of the step, ``MB`` the longest block table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class AttnMeta:
    """``positions [T]`` and ``slot_mapping [T]`` (cache slot of each new token);
    ``tok_idx [B, Q]`` (row of ``T`` of each padded query, 0 for padding);
    ``valid_rows [T]`` (the padded ``B * Q`` rows that hold a real query, in token order);
    ``block_tables [B, MB]`` (0-padded); ``qpos [B, Q]`` (position of each padded query);
    ``q_lens``, ``ctx_lens`` and ``q_starts [B]`` (new tokens, tokens in the cache after the step,
    first row of ``T``); and the host-side sizes that shape the kernels' loops."""

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    tok_idx: torch.Tensor
    valid_rows: torch.Tensor
    block_tables: torch.Tensor
    qpos: torch.Tensor
    q_lens: torch.Tensor
    ctx_lens: torch.Tensor
    q_starts: torch.Tensor
    num_seqs: int
    max_q: int
    max_ctx: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def to(self, device: torch.device | str) -> "AttnMeta":
        """A copy with every tensor on ``device`` (non-blocking: the host copies are fresh)."""
        if torch.device(device) == self.positions.device:
            return self
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    @staticmethod
    def build(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> "AttnMeta":
        """The step's indexing for sequences with ``q_lens[i]`` new tokens (0 allowed: an empty chunk)
        and ``ctx_lens[i]`` tokens in the cache after the step; every shape comes from the lists, so
        nothing waits for the device."""
        if not (len(q_lens) == len(ctx_lens) == len(block_tables)) or not q_lens:
            raise ValueError("q_lens, ctx_lens and block_tables need one entry per sequence (at least one)")
        for q, c, t in zip(q_lens, ctx_lens, block_tables):
            if not 0 <= q <= c or len(t) * block_size < c:
                raise ValueError(f"a sequence with {q} new of {c} tokens and {len(t)} blocks of {block_size}")
        return AttnMeta._on_host(q_lens, ctx_lens, block_tables, block_size).to(device)

    @staticmethod
    def _on_host(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
                 block_size: int) -> "AttnMeta":
        b = len(q_lens)
        i64 = dict(dtype=torch.int64, device="cpu")
        total, qmax = sum(q_lens), max(q_lens)
        q_len_t = torch.tensor(q_lens, **i64)
        ctx_t = torch.tensor(ctx_lens, **i64)
        starts = torch.cumsum(q_len_t, 0) - q_len_t
        seq_of_tok = torch.repeat_interleave(torch.arange(b, **i64), q_len_t, output_size=total)
        positions = (ctx_t - q_len_t)[seq_of_tok] + torch.arange(total, **i64) - starts[seq_of_tok]
        max_blocks = max(1, max(len(t) for t in block_tables))
        bt = torch.tensor([list(t) + [0] * (max_blocks - len(t)) for t in block_tables], **i64)
        slot_mapping = bt[seq_of_tok, positions // block_size] * block_size + positions % block_size
        qi = torch.arange(qmax, **i64)
        valid_q = qi.unsqueeze(0) < q_len_t.unsqueeze(1)
        tok_idx = torch.where(valid_q, starts.unsqueeze(1) + qi, torch.zeros_like(qi))
        qpos = (ctx_t - q_len_t).unsqueeze(1) + qi
        valid_rows = torch.tensor([i * qmax + j for i, n in enumerate(q_lens) for j in range(n)], **i64)
        return AttnMeta(positions, slot_mapping, tok_idx, valid_rows, bt, qpos, q_len_t, ctx_t, starts,
                        num_seqs=b, max_q=qmax, max_ctx=max(ctx_lens), block_size=block_size)
