"""The Serve application on a real local Ray cluster, over real sockets.

2 expert shards holding different experts of every layer plus a replicated
expert, 2 attention replicas; greedy outputs must equal the in-process engine.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.client import AsyncMoeyardClient, MoeyardClient, MoeyardError
from moeyard.cluster.config import ClusterConfig, EngineSettings
from moeyard.cluster.serving.app import APP_NAME, build_app
from tests.cluster.serving.sink_stats import ingress_sink_stats
from tests.conftest import FAMILIES

PROMPT_LENS = [3, 9, 17, 30]
NEW_TOKENS = 12
TOKEN = "test-token-0123456789"


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _reference(ckpt, prompts) -> list[list[int]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replicas and shards compute with one thread each
    try:
        engine = LLMEngine(ckpt, EngineConfig(dtype="float32"))
        return engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        torch.set_num_threads(threads)


def _deploy(ckpt, tmp_path, **over) -> str:
    from ray import serve

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cfg = ClusterConfig(model=str(ckpt), dtype="float32", expert_shards=2, redundant_slots_per_shard=1,
                        attention_replicas=2, replica_num_cpus=1, shard_num_cpus=1, torch_threads=1,
                        api_token_file=str(token_file), engine=EngineSettings(kv_cache_mib=16), **over)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    return serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)


async def _generate_all(addr: str, prompts) -> list[list[int]]:
    client = AsyncMoeyardClient(addr, token=TOKEN, timeout=120)
    try:
        results = await asyncio.gather(*[
            client.generate_all(p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in prompts])
    finally:
        await client.close()
    return [r.token_ids for r in results]


@pytest.mark.parametrize("family", FAMILIES)
def test_cluster_equals_in_process_engine(family, hf_models, ray_serve, tmp_path):
    ckpt, _ = hf_models(family)
    prompts = _prompts(256)
    addr = _deploy(ckpt, tmp_path)
    assert asyncio.run(_generate_all(addr, prompts)) == _reference(ckpt, prompts)
    sink = ingress_sink_stats(addr)  # the tokens came through the replicas' output streams
    # every step but a request's last went through the sink; a delta racing its request's last item
    # (which comes on the Serve call and lists every token) arrives after the stream ended: "late"
    assert sink.deltas + sink.late >= len(prompts) * (NEW_TOKENS - 1) and sink.dropped == 0
    assert sink.batches < sink.deltas + sink.late


def test_overlap_on_and_another_placement_give_the_same_tokens(hf_models, ray_serve, tmp_path):
    ckpt, _ = hf_models("mixtral")
    prompts = _prompts(256)
    expected = _reference(ckpt, prompts)
    assert asyncio.run(_generate_all(_deploy(ckpt, tmp_path, overlap=True, overlap_mode="always"),
                                     prompts)) == expected
    # adaptive: the replica probes whole and split steps, then keeps the faster; tokens never change
    assert asyncio.run(_generate_all(_deploy(ckpt, tmp_path, overlap=True), prompts)) == expected
    # experts dealt in reverse, two hot copies on the other shard
    other = [[7, 6, 5, 4, 0, 3, 2, 1, 0, 7]] * 2
    # (and the tokens on each request's Serve call instead of the replicas' output streams)
    assert asyncio.run(_generate_all(_deploy(ckpt, tmp_path, placement=other, output_sink=False),
                                     prompts)) == expected


def test_api_surface_through_the_cluster(hf_models, ray_serve, tmp_path):
    ckpt, _ = hf_models("qwen2_moe")
    addr = _deploy(ckpt, tmp_path)
    client = MoeyardClient(addr, token=TOKEN, timeout=60)
    assert client.health() == "SERVING"
    info = client.model_info()
    assert info["num_expert_shards"] == 2 and info["num_attention_replicas"] == 2
    chunks = list(client.generate([5, 6, 7], max_new_tokens=6, ignore_eos=True))
    assert len(chunks) >= 2 and sum(len(c.token_ids) for c in chunks) == 6
    assert chunks[-1].finish_reason == "length"
    with pytest.raises(MoeyardError) as e:
        MoeyardClient(addr, token="wrong", timeout=30).generate_all([5, 6], max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(MoeyardError) as e:
        client.generate_all([], max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.value.message
    with pytest.raises(MoeyardError) as e:
        client.generate_all([5] * 600, max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.message
    assert client.generate_all([5, 6, 7], max_new_tokens=3, ignore_eos=True).token_ids  # still serving


@pytest.mark.parametrize("family, mode, experts, top_k, inter", [
    ("llama", "copy", 5, 2, 88), ("qwen2", "copy", 5, 2, 88),
    ("llama", "split", 4, 4, 96)])  # split with every expert active: the dense function too
def test_upcycled_dense_model_serves_the_dense_tokens(family, mode, experts, top_k, inter, ray_serve, tmp_path):
    """Dense Llama / Qwen2 (three layers, odd widths) upcycled (k-means routers for copy), through the
    cluster: the dense model's greedy tokens in transformers (fp32), however the experts are spread."""
    from moeyard.attention.ffn_capture import ffn_inputs
    from moeyard.model.upcycle import UpcycleOptions, upcycle
    from tests.conftest import save_hf_model

    dense_dir = tmp_path / "dense"
    extra = {"layer_types": ["full_attention"] * 3} if family == "qwen2" else {}
    model = save_hf_model(family, dense_dir, num_hidden_layers=3, intermediate_size=inter, hidden_size=48,
                          num_attention_heads=3, num_key_value_heads=1, **extra)
    calib = torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(5)).tolist()
    opts = UpcycleOptions(experts=experts, top_k=top_k, mode=mode, router="kmeans" if mode == "copy" else "random")
    moe = upcycle(dense_dir, tmp_path / "moe", opts, calib_inputs=lambda: ffn_inputs(dense_dir, calib))
    prompts = _prompts(256)
    want = []
    for p in prompts:
        with torch.no_grad():
            want.append(model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(p):].tolist())
    assert asyncio.run(_generate_all(_deploy(moe, tmp_path), prompts)) == want
