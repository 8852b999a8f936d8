"""Paged KV-cache block manager: allocation, ref counts, prefix reuse.

Blocks hold ``block_size`` token positions. A sequence owns a block table
(list of block ids). Full blocks of a prompt are registered under a chained
hash of their tokens; a later prompt that starts with the same tokens shares
those blocks (ref count + 1) instead of recomputing them. Freed blocks whose
content is cached stay reusable until their space is needed (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class NoFreeBlocks(RuntimeError):
    """The cache has no free block; the scheduler preempts or waits."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0, 1, ...
        self._cached: dict[int, int] = {}         # content hash -> block
        self._block_hash: dict[int, int] = {}     # block -> content hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, LRU first

    # -- accounting --------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation --------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            h = self._block_hash.pop(b)
            if self._cached.get(h) == b:
                del self._cached[h]
        else:
            raise NoFreeBlocks("KV cache is full")
        self.ref[b] = 1
        return b

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks (all or none)."""
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_free} free")
        return [self._take() for _ in range(n)]

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} freed twice")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self._block_hash:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # -- prefix reuse ------------------------------------------------------------
    @staticmethod
    def chain_hashes(tokens: Sequence[int], block_size: int, num_blocks: int) -> list[int]:
        hashes, h = [], 0
        for i in range(num_blocks):
            h = hash((h, tuple(tokens[i * block_size:(i + 1) * block_size])))
            hashes.append(h)
        return hashes

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Take shared references to the cached full blocks that start ``tokens``.

        At least one token is always left to compute (its logits are needed).
        """
        if not self.enable_prefix_caching:
            return []
        full = (len(tokens) - 1) // self.block_size
        got: list[int] = []
        for h in self.chain_hashes(tokens, self.block_size, full):
            b = self._cached.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                self._evictable.pop(b, None)
            self.ref[b] += 1
            got.append(b)
        return got

    def register_full_blocks(self, tokens: Sequence[int], block_table: Sequence[int], num_computed: int) -> None:
        """Publish the fully computed blocks of a sequence for reuse."""
        if not self.enable_prefix_caching:
            return
        full = min(num_computed, len(tokens)) // self.block_size
        for i, h in enumerate(self.chain_hashes(tokens, self.block_size, full)):
            b = block_table[i]
            if b in self._block_hash:
                continue
            if h not in self._cached:
                self._cached[h] = b
                self._block_hash[b] = h
