"""The committed gRPC stubs are what the .proto files generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", ROOT / "proto" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "no .proto files generated anything"
    for f in fresh:
        committed = ROOT / "moeyard" / "v1" / f.name
        assert committed.is_file(), f"{committed} missing: run proto/generate.py"
        assert committed.read_text() == f.read_text(), f"{committed.name} is stale: run proto/generate.py"


def test_service_names_in_rpc_match_the_protos():
    """moeyard.rpc's constants are what client and server both use: they name the services the stubs define."""
    from moeyard import rpc
    from moeyard.v1 import expert_pb2, inference_pb2

    assert rpc.INFERENCE_SERVICE == inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    assert rpc.EXPERT_SERVICE == expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
