"""An expert shard makes every tensor of a compute on its device (see tests/attention/test_device_guard.py)."""

from __future__ import annotations

import torch

from moeyard.expert_actors.server import ExpertServer
from moeyard.model.spec import load_spec
from tests.device_guard import default_device_meta


def test_shard_compute_makes_no_tensor_on_the_default_device(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with default_device_meta():
        server = ExpertServer(0, spec, ckpt, "float32", {0: [(0, 1), (1, 4)], 1: [(0, 2), (1, 3)]})
        try:
            out, _ = server.compute(1, [0, 1], [2, 3], x, epoch=0, experts=[2, 3])
            empty, _ = server.compute(0, [], [], x[:0], epoch=0, experts=[])
        finally:
            server.stop(0)
    assert out.device.type == "cpu" and out.shape == (5, spec.hidden_size) and bool(torch.isfinite(out).all())
    assert empty.device.type == "cpu" and empty.shape == (0, spec.hidden_size)
