"""The initial placement a cluster config asks for."""

from __future__ import annotations

import torch

from moeyard.cluster.config import ClusterConfig
from moeyard.model.spec import ModelSpec
from moeyard.router_service.placement import Placement, round_robin_placement


def initial_placement(cfg: ClusterConfig, spec: ModelSpec) -> Placement:
    """``cfg.placement`` if given (validated), else experts in order with
    ``redundant_slots_per_shard`` copies per shard."""
    if spec.moe is None:
        raise ValueError(f"{spec.family} has no MoE layers: there is nothing to place on expert shards")
    num_layers, num_experts = spec.num_moe_layers, spec.moe.num_experts
    if cfg.placement is not None:
        p2l = torch.tensor(cfg.placement, dtype=torch.int64)
        if p2l.shape[0] != num_layers:
            raise ValueError(f"placement has {p2l.shape[0]} rows; the model has {num_layers} MoE layers")
        if int(p2l.min()) < 0 or int(p2l.max()) >= num_experts:
            raise ValueError(f"placement names experts outside [0, {num_experts})")
        placement = Placement(p2l, cfg.expert_shards)
    else:
        per_shard = -(-num_experts // cfg.expert_shards) + cfg.redundant_slots_per_shard
        placement = round_robin_placement(num_layers, num_experts, cfg.expert_shards, per_shard)
    placement.validate(num_experts)
    return placement


def placement_fingerprint(cfg: ClusterConfig, spec: ModelSpec, placement: Placement) -> str:
    """What a stored placement is for: a placement recovered from Redis is used only if the
    model, dtype and cluster shape still match (a changed config starts from the static one)."""
    return (f"{cfg.model_dir().resolve()}|{cfg.dtype or 'auto'}|L{spec.num_moe_layers}xE{spec.moe.num_experts}"
            f"|N{placement.num_shards}xS{placement.slots_per_shard}")
