"""TLS on a real local Ray cluster: the public API over TLS, the expert protocol over mutual TLS.

With certificates configured (a self-signed test CA), greedy outputs through the cluster equal
the in-process engine and their tokens came through the ingress's output sink; a plaintext client
is refused by the API and by the sink; a shard refuses a plaintext channel and a TLS channel
without a client certificate.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.client import MoeyardClient, MoeyardError
from moeyard.cluster.config import ClusterConfig, EngineSettings
from moeyard.cluster.serving.app import APP_NAME, build_app
from moeyard.cluster.settings.tls import TLSSettings
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions
from moeyard.v1 import expert_pb2, expert_pb2_grpc
from tests.certs import make_certs
from tests.cluster.serving.sink_stats import ingress_sink_stats

pytestmark = pytest.mark.timeout(300)
TOKEN = "tls-cluster-token-0123456789"


def test_api_tls_and_internal_mutual_tls(ray_serve, tmp_path):
    from ray import serve

    model = tmp_path / "model"
    make_model(MakeModelOptions(family="mixtral", layers=2, hidden=64, intermediate=96, experts=8, top_k=2,
                                heads=4, kv_heads=2, vocab=300, dtype="float32", seed=17), model)
    ca, cert, key = make_certs(tmp_path, ips=("127.0.0.1",), dns=("localhost", "moeyard-internal"))
    (tmp_path / "token").write_text(TOKEN)
    cfg = ClusterConfig(model=str(model), dtype="float32", namespace="tls-test", expert_shards=2,
                        attention_replicas=1, torch_threads=1, api_token_file=str(tmp_path / "token"),
                        engine=EngineSettings(kv_cache_mib=16),
                        tls=TLSSettings(cert_file=str(cert), key_file=str(key), ca_file=str(ca)))
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    try:
        addr = serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)
        prompt = [7, 19, 23, 100, 5]
        with MoeyardClient(addr, token=TOKEN, timeout=60, tls_root_certs=ca.read_bytes()) as client:
            got = client.generate_all(prompt, max_new_tokens=8, ignore_eos=True).token_ids
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref = LLMEngine(model, EngineConfig(dtype="float32")).generate(
                [prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        finally:
            torch.set_num_threads(threads)
        assert got == ref                               # routers reached the shards over mutual TLS
        sink = ingress_sink_stats(addr)
        assert sink.deltas >= 7                         # ... and the replica reached the output sink
        with grpc.insecure_channel(sink.address) as ch:  # plaintext to the TLS sink
            deliver = ch.stream_unary("/moeyard.v1.OutputSink/Deliver")
            with pytest.raises(grpc.RpcError) as e:
                deliver(iter([b""]), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with MoeyardClient(addr, token=TOKEN, timeout=5) as plain:
            with pytest.raises(MoeyardError) as e:
                plain.generate_all(prompt, max_new_tokens=2)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE

        shard = serve.get_deployment_handle("ShardManager", APP_NAME).addresses.remote().result(timeout_s=30)[0]
        status = expert_pb2.StatusRequest()
        with grpc.insecure_channel(shard) as ch:        # plaintext to a TLS shard
            with pytest.raises(grpc.RpcError) as e:
                expert_pb2_grpc.ExpertServiceStub(ch).Status(status, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        server_only = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        opts = [("grpc.ssl_target_name_override", "moeyard-internal")]
        with grpc.secure_channel(shard, server_only, options=opts) as ch:  # TLS but no client certificate
            with pytest.raises(grpc.RpcError) as e:
                expert_pb2_grpc.ExpertServiceStub(ch).Status(status, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        mutual = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
        with grpc.secure_channel(shard, mutual, options=opts) as ch:       # what routers do
            assert expert_pb2_grpc.ExpertServiceStub(ch).Status(status, timeout=10).shard_id == 0
    finally:
        serve.delete(APP_NAME)


def test_tls_settings_are_checked():
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        TLSSettings(cert_file="c.pem")
    with pytest.raises(ValueError, match="needs ca_file"):
        TLSSettings(cert_file="c.pem", key_file="k.pem")
    assert not TLSSettings().api_enabled and not TLSSettings().internal_enabled
    assert TLSSettings(cert_file="c", key_file="k", internal=False).api_enabled
