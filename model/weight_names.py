"""Tensor names of the hub checkpoint layout, per model family.

The only place that knows how each family names its tensors; the attention side
and the expert shards ask here instead of formatting names themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FFNNames:
    gate: str
    up: str
    down: str


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def moe_prefix(family: str, layer: int) -> str:
    sub = "block_sparse_moe" if family == "mixtral" else "mlp"
    return f"{layer_prefix(layer)}.{sub}"


def expert_names(family: str, layer: int, expert: int) -> FFNNames:
    p = f"{moe_prefix(family, layer)}.experts.{expert}"
    if family == "mixtral":
        return FFNNames(f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight")
    return FFNNames(f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight")


def router_weight_name(family: str, layer: int) -> str:
    return f"{moe_prefix(family, layer)}.gate.weight"


def correction_bias_name(family: str, layer: int) -> str:
    return f"{moe_prefix(family, layer)}.gate.e_score_correction_bias"


def _ffn(prefix: str) -> FFNNames:
    return FFNNames(f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight")


def shared_expert_names(family: str, layer: int) -> FFNNames:
    sub = "shared_expert" if family == "qwen2_moe" else "shared_experts"
    return _ffn(f"{moe_prefix(family, layer)}.{sub}")


def shared_expert_gate_name(layer: int) -> str:
    return f"{layer_prefix(layer)}.mlp.shared_expert_gate.weight"


def dense_mlp_names(layer: int) -> FFNNames:
    return _ffn(f"{layer_prefix(layer)}.mlp")


def is_expert_tensor(name: str) -> bool:
    """True for routed-expert weights (the part that lives on expert shards)."""
    return ".experts." in name
