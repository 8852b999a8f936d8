"""What ``moeyard make-model`` generates: the options, validated, and the per-family constants."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeyard.model.spec import SUPPORTED_FAMILIES
from moeyard.model.tokenizer_builder import MIN_VOCAB_SIZE

TRANSFORMERS_LAYOUT_VERSION = "5.23.0"
"""The ``transformers`` release whose ``save_pretrained`` layout the writer reproduces."""

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
ROPE_THETA = {"mixtral": 1e6, "qwen2_moe": 1e6, "qwen3_moe": 1e6, "qwen2": 1e6, "llama": 5e5,
               "olmoe": 1e4, "deepseek_v2": 1e4, "deepseek_v3": 1e4}
RMS_EPS = {"mixtral": 1e-5, "olmoe": 1e-5, "llama": 1e-5}

INIT_STD = 0.02


@dataclass(frozen=True)
class MakeModelOptions:
    """What to generate (validated on construction; ``ValueError`` says what is wrong).

    ``family``: a ``model_type`` of :data:`moeyard.model.spec.SUPPORTED_FAMILIES`.
    ``intermediate``: routed-expert width; dense MLPs and the Qwen2-MoE shared expert are
    ``2 * intermediate`` (see the module docstring). ``experts``/``top_k`` are ignored by
    the dense families. DeepSeek uses ``num_key_value_heads = heads`` (MLA) whatever
    ``kv_heads`` says. ``dtype``: ``"bfloat16"`` or ``"float32"``. ``skew``: Zipf exponent of
    the expert load (0 = uniform; MoE families only). ``max_shard_bytes``: write
    ``model-0000k-of-0000n.safetensors`` shards of at most this size (a single larger
    tensor gets a shard of its own) plus ``model.safetensors.index.json``.
    """

    family: str
    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    experts: int = 8
    top_k: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    seed: int = 0
    skew: float = 0.0
    max_shard_bytes: int | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"make-model: {msg}")

        if self.family not in SUPPORTED_FAMILIES:
            bad(f"unknown family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.dtype not in DTYPES:
            bad(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            bad(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            bad(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if (self.hidden // self.heads) % 2:
            bad(f"head dim hidden/heads = {self.hidden // self.heads} must be even (rotary embeddings)")
        if self.family.startswith("deepseek") and self.hidden // self.heads < 4:
            bad("deepseek families need hidden/heads >= 4 (MLA rope part is half a head)")
        if self.vocab < MIN_VOCAB_SIZE:
            bad(f"vocab must be >= {MIN_VOCAB_SIZE} (byte-level BPE: 3 special tokens + 256 bytes), got {self.vocab}")
        if self.family in MOE_FAMILIES:
            if self.experts < 1 or not 1 <= self.top_k <= self.experts:
                bad(f"need experts >= 1 and 1 <= top_k <= experts, got experts={self.experts} top_k={self.top_k}")
            if self.family == "deepseek_v3" and self.experts < 2:
                bad("deepseek_v3 needs experts >= 2 (its group scores take the top-2 experts of a group)")
        if not (math.isfinite(self.skew) and self.skew >= 0):
            bad(f"skew must be a finite number >= 0, got {self.skew}")
        if self.skew > 0 and self.family not in MOE_FAMILIES:
            bad(f"skew biases MoE routers; family {self.family!r} has none")
        if self.max_shard_bytes is not None and self.max_shard_bytes <= 0:
            bad(f"max_shard_bytes must be positive, got {self.max_shard_bytes}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_moe(self) -> bool:
        return self.family in MOE_FAMILIES

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def dense_intermediate(self) -> int:
        return 2 * self.intermediate


