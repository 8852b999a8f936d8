"""Continuous-batching scheduler.

Every step it (1) gives each running sequence its next tokens (one for a
decode, a chunk for an unfinished prefill), preempting the most recently
admitted sequences by recomputation when the KV cache runs out, then (2) admits
waiting requests, FIFO, while the token budget, the sequence limit and free
blocks allow. New requests thus join a running batch at any step, and
sequences leave it as soon as they finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeyard.attention.block_manager import BlockManager
from moeyard.attention.sequence import RequestError, SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def check(self, seq: Sequence) -> None:
        """Refuse a request that can never run on this engine."""
        n = len(seq.prompt_token_ids)
        if n == 0:
            raise RequestError("prompt is empty")
        if n >= self.cfg.max_model_len:
            raise RequestError(f"prompt has {n} tokens; the maximum context is {self.cfg.max_model_len} tokens "
                               f"(prompt plus at least one new token)")
        need = self.blocks.blocks_for(min(n + seq.params.max_tokens, self.cfg.max_model_len))
        if need > self.blocks.num_blocks:
            raise RequestError(f"request needs {need} KV-cache blocks (prompt {n} + max_new_tokens "
                               f"{seq.params.max_tokens}) but the cache has only {self.blocks.num_blocks}")

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks (on finish, abort or preemption)."""
        self.blocks.free(seq.block_table)
        seq.block_table = []

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _grow(self, seq: Sequence, upto: int) -> bool:
        need = self.blocks.blocks_for(upto) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        seq.block_table.extend(self.blocks.allocate(need))
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.cfg.max_num_batched_tokens
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                batch.seqs.append(seq)
                batch.num_new.append(n)
                budget -= n
        if batch.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = self.blocks.match_prefix(seq.token_ids)
                seq.block_table = cached
                seq.num_computed = len(cached) * self.blocks.block_size
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = seq.num_computed
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self.release(seq)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
        return batch
