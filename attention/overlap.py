"""When to split a step into two micro-batches (ping-pong overlap), decided by measurement.

Ping-pong (MegaScale-Infer) runs the attention of one micro-batch while the
other's routed experts are at the shards. It pays only when there is idle
hardware to hide the round trip behind: shards on their own devices. Where the
shards share the replica's cores (a small CPU host) the two halves just take
turns on the same cores, and each half streams every expert's weights again, so
splitting costs up to ~2x the expert time (docs/benchmarks.md). Whether a split
pays therefore depends on the deployment, the batch size and the load, so the
engine measures it instead of guessing:

- steps are grouped by shape: the :func:`size_bucket` of the step's token
  count and of its sequence count (a decode step of 64 sequences and one
  prefill chunk of 64 tokens cost very differently per token);
- per bucket the tuner keeps the recent wall time per token of steps run whole
  and of steps run split, probing each mode for ``probe_steps`` steps;
- it then runs the mode with the lower median, and every ``reprobe_every``
  steps of a bucket it measures the other mode again (the deployment or the
  load may have changed), so exploring costs about
  ``probe_steps / reprobe_every`` of the steps.

``mode="always"`` splits every step that has two sequences or more (the
behaviour before this tuner; what tests use to exercise the split path).
Splitting never changes the tokens, only the schedule.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

OverlapMode = Literal["adaptive", "always"]


def size_bucket(num_tokens: int) -> int:
    """Bucket of a step with ``num_tokens`` tokens: its power of two (1, 2-3, 4-7, 8-15, ...)."""
    return max(int(num_tokens), 1).bit_length()


def _key(num_tokens: int, num_seqs: int) -> tuple[int, int]:
    return size_bucket(num_tokens), size_bucket(num_seqs)


def _label(key: tuple[int, int]) -> str:
    (t, s) = key
    return f"tokens {1 << (t - 1)}-{(1 << t) - 1}, seqs {1 << (s - 1)}-{(1 << s) - 1}"


@dataclass(frozen=True)
class OverlapTunerConfig:
    mode: OverlapMode = "adaptive"
    probe_steps: int = 4
    """Steps measured in each mode before the tuner picks one (and when it re-measures)."""
    reprobe_every: int = 256
    """Steps of a bucket between re-measurements of the mode not in use."""

    def __post_init__(self):
        if self.mode not in ("adaptive", "always"):
            raise ValueError(f"overlap mode must be 'adaptive' or 'always', got {self.mode!r}")
        if self.probe_steps < 1 or self.reprobe_every < 1:
            raise ValueError("probe_steps and reprobe_every must be >= 1")


@dataclass
class _Bucket:
    whole: deque = field(default_factory=deque)
    split: deque = field(default_factory=deque)
    steps: int = 0
    choice: bool | None = None  # True: split; None: still probing


class OverlapTuner:
    """Chooses per step whether to split; learns from :meth:`observe`. Not thread-safe (the engine
    loop is its only caller)."""

    def __init__(self, config: OverlapTunerConfig = OverlapTunerConfig()):
        self.config = config
        self._buckets: dict[tuple[int, int], _Bucket] = {}

    def should_split(self, num_tokens: int, num_seqs: int) -> bool:
        """Whether a step of ``num_tokens`` tokens over ``num_seqs`` sequences runs as two micro-batches."""
        if num_seqs < 2:
            return False
        if self.config.mode == "always":
            return True
        b = self._buckets.setdefault(_key(num_tokens, num_seqs), _Bucket())
        n = self.config.probe_steps
        if len(b.whole) < n or len(b.split) < n:  # probing: the mode with fewer samples goes next
            return len(b.split) < len(b.whole)
        return bool(b.choice)

    def observe(self, num_tokens: int, num_seqs: int, split: bool, seconds: float) -> None:
        """A step of ``num_tokens`` tokens over ``num_seqs`` sequences ran (split or whole) in
        ``seconds`` of wall time."""
        if self.config.mode == "always" or num_tokens <= 0 or num_seqs < 2:
            return
        b = self._buckets.setdefault(_key(num_tokens, num_seqs), _Bucket())
        n = self.config.probe_steps
        samples = b.split if split else b.whole
        samples.append(seconds / num_tokens)
        while len(samples) > n:
            samples.popleft()
        b.steps += 1
        if len(b.whole) >= n and len(b.split) >= n:
            whole, split_s = statistics.median(b.whole), statistics.median(b.split)
            choice = split_s < whole
            if choice != b.choice:
                log.info("overlap: steps of %s now run %s (measured %.3f ms/token whole, %.3f split)",
                         _label(_key(num_tokens, num_seqs)), "split" if choice else "whole",
                         1e3 * whole, 1e3 * split_s)
            b.choice = choice
            if b.steps >= self.config.reprobe_every:  # forget the idle mode's figures: measure it again
                b.steps = 0
                (b.whole if b.choice else b.split).clear()

    def snapshot(self) -> dict[str, dict]:
        """Per step shape (``"tokens T-U, seqs S-R"``): the mode in use (``None`` while probing) and the
        median seconds per token measured whole and split."""
        return {_label(k): {"split": b.choice,
                    "whole_s_per_token": statistics.median(b.whole) if b.whole else None,
                    "split_s_per_token": statistics.median(b.split) if b.split else None}
                for k, b in sorted(self._buckets.items())}
