"""The ``config.json`` of a generated checkpoint, as ``transformers`` writes it for each family."""

from __future__ import annotations

from moeyard.model.make_model_options import (
    ARCHITECTURES,
    INIT_STD,
    RMS_EPS,
    ROPE_THETA,
    TRANSFORMERS_LAYOUT_VERSION,
    MakeModelOptions,
)
from moeyard.model.tokenizer_builder import BOS_ID, EOS_ID


def mla_dims(o: MakeModelOptions) -> dict:
    hd = o.head_dim
    rope = max(2, (hd // 2) // 2 * 2)
    return dict(
        q_lora_rank=max(1, o.hidden // 2) if o.family == "deepseek_v3" else None,
        kv_lora_rank=max(1, o.hidden // 2),
        qk_nope_head_dim=hd,
        qk_rope_head_dim=rope,
        v_head_dim=hd,
    )


def _v3_groups(experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group): at most 4 groups dividing the experts, >= 2 experts a group."""
    n_group = max(g for g in range(1, min(4, experts) + 1) if experts % g == 0 and (g == 1 or experts // g >= 2))
    topk_group = min(2, n_group)
    while topk_group * (experts // n_group) < top_k:
        topk_group += 1
    return n_group, topk_group


def first_dense_layers(o: MakeModelOptions) -> int:
    """DeepSeek ``first_k_dense_replace``: one dense layer when there are >= 3 layers."""
    return 1 if o.family.startswith("deepseek") and o.layers >= 3 else 0


def build_config(o: MakeModelOptions) -> dict:
    """The ``config.json`` dict for ``o`` (keys as ``transformers`` 5.23 and the hub use them)."""
    fam = o.family
    theta = ROPE_THETA[fam]
    cfg: dict = {
        "architectures": [ARCHITECTURES[fam]],
        "model_type": fam,
        "vocab_size": o.vocab,
        "hidden_size": o.hidden,
        "num_hidden_layers": o.layers,
        "num_attention_heads": o.heads,
        "num_key_value_heads": o.kv_heads,
        "head_dim": o.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": o.max_position_embeddings,
        "initializer_range": INIT_STD,
        "rms_norm_eps": RMS_EPS.get(fam, 1e-6),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "torch_dtype": o.dtype,
        "dtype": o.dtype,
        "transformers_version": TRANSFORMERS_LAYOUT_VERSION,
    }
    moe_common = {"num_experts_per_tok": o.top_k, "output_router_logits": False}
    if fam == "mixtral":
        cfg.update(intermediate_size=o.intermediate, num_local_experts=o.experts, sliding_window=None,
                   router_aux_loss_coef=0.02, router_jitter_noise=0.0, **moe_common)
    elif fam in ("qwen2_moe", "qwen3_moe"):
        cfg.update(intermediate_size=o.dense_intermediate, moe_intermediate_size=o.intermediate,
                   num_experts=o.experts, decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=0.001, use_sliding_window=False, sliding_window=None,
                   max_window_layers=o.layers, **moe_common)
        if fam == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=o.dense_intermediate, norm_topk_prob=False, qkv_bias=True,
                       layer_types=["full_attention"] * o.layers)
        else:
            # transformers 5.23 maps num_experts -> num_local_experts for Qwen3-MoE and saves the latter;
            # the hub checkpoints carry num_experts. Write both (equal).
            cfg.update(num_local_experts=o.experts, norm_topk_prob=True, attention_bias=False)
    elif fam == "olmoe":
        cfg.update(intermediate_size=o.intermediate, num_experts=o.experts, norm_topk_prob=False,
                   attention_bias=False, clip_qkv=None, router_aux_loss_coef=0.01, **moe_common)
    elif fam in ("deepseek_v2", "deepseek_v3"):
        v3 = fam == "deepseek_v3"
        mla = mla_dims(o)
        cfg.update(mla)
        cfg.update(
            num_key_value_heads=o.heads,        # MLA: every head has its own K/V (from the shared latent)
            head_dim=mla["qk_rope_head_dim"],    # what transformers' config sets (and saves) for MLA
            qk_head_dim=mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"],
            intermediate_size=o.dense_intermediate,
            moe_intermediate_size=o.intermediate,
            n_routed_experts=o.experts,
            n_shared_experts=1,
            first_k_dense_replace=first_dense_layers(o),
            moe_layer_freq=1,
            attention_bias=False,
            **moe_common,
        )
        if v3:
            n_group, topk_group = _v3_groups(o.experts, o.top_k)
            cfg.update(n_group=n_group, topk_group=topk_group, topk_method="noaux_tc", scoring_func="sigmoid",
                       norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
                       num_nextn_predict_layers=0)
        else:
            cfg.update(n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                       norm_topk_prob=False, routed_scaling_factor=1.0, mlp_bias=False)
    elif fam == "llama":
        cfg.update(intermediate_size=o.dense_intermediate, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif fam == "qwen2":
        cfg.update(intermediate_size=o.dense_intermediate, use_sliding_window=False, sliding_window=None,
                   max_window_layers=o.layers, layer_types=["full_attention"] * o.layers)
    return dict(sorted(cfg.items()))


