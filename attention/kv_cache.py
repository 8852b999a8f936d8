"""Paged KV cache storage.

Each layer's cache is one flat tensor of ``num_blocks * block_size`` token
slots; token slot ``block * block_size + offset`` belongs to the sequence whose
block table holds ``block``. GQA layers store K and V (``[S, KV, hd]`` each);
DeepSeek MLA layers store only the compressed latent and the rotary key
(``[S, kv_lora_rank + qk_rope_head_dim]``), which is what makes MLA's cache
small.
"""

from __future__ import annotations

import torch

from moeyard.model.spec import ModelSpec


def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    elt = dtype.itemsize
    if spec.mla:
        per_token = spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim
    else:
        per_token = 2 * spec.num_kv_heads * spec.head_dim
    return spec.num_layers * block_size * per_token * elt


class KVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.num_blocks = num_blocks
        self.block_size = block_size
        n = num_blocks * block_size
        self.mla = spec.mla is not None
        if self.mla:
            width = spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim
            self.latent = [torch.zeros(n, width, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        else:
            shape = (n, spec.num_kv_heads, spec.head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
