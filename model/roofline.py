"""The roofline of a model's steps on a machine (pure math, from ``config.json`` alone).

A step that performs ``F`` floating-point operations and must move ``W`` bytes through memory cannot
take less than ``max(F / peak FLOP/s, W / memory bandwidth)``: its *roofline time*. For decoding, ``W``
is the weights the step reads (every weight of the dense parts, each routed expert some token of the
batch chose, the LM head) and the KV cache its attention reads; ``F`` is two FLOPs per multiply-add:
``2 x active parameters`` per token plus the attention's scores and weighted sums. A step is
*memory-bound* when the byte time is the larger (small batches), *compute-bound* otherwise.

Routed experts touched by a batch: with ``T`` tokens each choosing ``k`` of ``E`` experts uniformly,
an expert is chosen by none of them with probability ``(1 - k/E)^T``, so ``E (1 - (1 - k/E)^T)``
experts are read in expectation (:func:`experts_touched`; all ``E`` for large batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moeyard.model.spec import ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Hardware:
    """What bounds a step on one device: peak matmul FLOP/s per dtype and memory bandwidth (bytes/s)."""

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_bytes: int | None = None
    interconnect_bandwidth: float | None = None
    """Bytes/s between devices (None: not known, or one device)."""
    source: str = ""
    """Where the figures come from ("measured on ...", "datasheet")."""
    details: dict[str, float] = field(default_factory=dict)
    """Further measured figures (e.g. copy bandwidth), for people."""

    def flops(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ValueError(f"hardware {self.name!r} has no peak FLOP/s for {dtype}; it has "
                             f"{', '.join(self.peak_flops)}") from None


@dataclass(frozen=True)
class StepCost:
    """The work of one step: ``flops``, ``weight_bytes`` read, ``kv_bytes`` read."""

    tokens: int
    flops: float
    weight_bytes: float
    kv_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class Roofline:
    """A step's floor on some hardware: ``compute_s`` (FLOPs / peak), ``memory_s`` (bytes / bandwidth)."""

    cost: StepCost
    compute_s: float
    memory_s: float

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> Literal["compute", "memory"]:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def tokens_per_s(self) -> float:
        return self.cost.tokens / self.time_s if self.time_s else float("inf")

    def fraction(self, measured_s: float) -> float:
        """How close a measured step came: ``roofline time / measured time`` (1.0 = at the roofline)."""
        return self.time_s / measured_s


def experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct routed experts ``T`` tokens choose (``k`` of ``E`` each, uniformly), per layer."""
    if num_experts <= 0 or tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _attention_params(spec: ModelSpec) -> int:
    d = spec.hidden_size
    if spec.mla:
        m = spec.mla
        q = (d * m.q_lora_rank + m.q_lora_rank * spec.num_heads * m.qk_head_dim if m.q_lora_rank
             else d * spec.num_heads * m.qk_head_dim)
        return (q + d * (m.kv_lora_rank + m.qk_rope_head_dim)
                + m.kv_lora_rank * spec.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
                + spec.num_heads * m.v_head_dim * d)
    return d * spec.head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> int:
    """KV-cache bytes one token of context takes over all layers (MLA: the latent and rope key)."""
    if spec.mla:
        per_layer = spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim
    else:
        per_layer = 2 * spec.num_kv_heads * spec.head_dim
    return spec.num_layers * per_layer * dtype_bytes


def _attention_flops_per_token(spec: ModelSpec, context: int) -> float:
    """Scores and weighted sum of one query token over ``context`` keys, all layers (multiply-adds x 2)."""
    if spec.mla:   # absorbed: scores over latent + rope, the sum over the latent
        m = spec.mla
        per_head = (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
    else:
        per_head = 2 * spec.head_dim
    return 2.0 * spec.num_layers * spec.num_heads * per_head * context


def decode_step(spec: ModelSpec, batch: int, context: int, dtype: str, top_k: int | None = None) -> StepCost:
    """One decode step of ``batch`` sequences with ``context`` tokens each: FLOPs and bytes read.

    Weights are read once per step whatever the batch; ``top_k`` overrides the checkpoint's (experts
    active per token)."""
    b = DTYPE_BYTES[dtype]
    d = spec.hidden_size
    attn = _attention_params(spec)
    dense_ffn = 3 * d * spec.dense_intermediate_size
    flops_per_token = 0.0
    weight_params = 0.0
    for layer in range(spec.num_layers):
        weight_params += attn
        flops_per_token += 2 * attn
        if spec.moe and layer in spec.moe_layers:
            m = spec.moe
            k = m.top_k if top_k is None else top_k
            per_expert = 3 * d * m.intermediate_size
            shared = (3 * d * m.shared_intermediate_size + d * m.num_experts
                      + (d if m.shared_expert_gated else 0))
            weight_params += experts_touched(m.num_experts, k, batch) * per_expert + shared
            flops_per_token += 2 * (k * per_expert + shared)
        else:
            weight_params += dense_ffn
            flops_per_token += 2 * dense_ffn
    head = spec.vocab_size * d
    weight_params += head
    flops_per_token += 2 * head + _attention_flops_per_token(spec, context)
    return StepCost(batch, flops_per_token * batch, weight_params * b,
                    float(kv_bytes_per_token(spec, b) * context * batch))


def roofline(cost: StepCost, hw: Hardware, dtype: str) -> Roofline:
    """``cost`` on ``hw`` computing in ``dtype``."""
    return Roofline(cost, cost.flops / hw.flops(dtype), cost.bytes / hw.memory_bandwidth)
