"""One ``Compute`` message's encoding and decoding: protobuf's own copies against the framed payload.

    .venv/bin/python -m bench.bench_wire [--repeats 7]

Each size is a request's hidden states (``[U, D]`` bf16) encoded on the router and decoded on the shard,
the way each path does it:

* ``protobuf``: ``tensor_to_proto`` (``tobytes``, then the message takes its own copy),
  ``SerializeToString`` (a copy), ``FromString`` (a copy) and the field read (a copy): the transport
  before ``expert_actors/frames.py``.
* ``framed``: ``encode_compute_request`` (one copy, into the bytes gRPC sends) and
  ``decode_compute_request`` + ``tensor_from_bytes`` (a view of the received bytes).

gRPC's own copy into and out of its buffers is the same for both and not included. Sizes: the bench
model at batch 32 (one shard's share, top-2 over two shards) and DeepSeek-V3's width (7168) at 32 and
256 tokens per shard. Interleaved repeat by repeat; medians with (min-max); the CPU model first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import print_machine
from moeyard.expert_actors.wire import (
    ComputeCall,
    decode_compute_request,
    encode_compute_request,
    tensor_from_bytes,
    tensor_from_proto,
    tensor_to_proto,
)
from moeyard.v1 import expert_pb2 as pb

SIZES = [(26, 1024), (32, 7168), (256, 7168)]


def _header() -> pb.ComputeRequest:
    return pb.ComputeRequest(moe_layer=1, epoch=3, slot_ids=[0, 1, 2, 3], counts=[8, 8, 8, 8],
                             experts=[0, 1, 2, 3], wire_version=2)


def protobuf_round_trip(x: torch.Tensor) -> torch.Tensor:
    req = _header()
    tensor_to_proto(x, out=req.hidden)
    return tensor_from_proto(pb.ComputeRequest.FromString(req.SerializeToString()).hidden)


def framed_round_trip(x: torch.Tensor) -> torch.Tensor:
    d = decode_compute_request(encode_compute_request(ComputeCall(_header(), x)))
    return tensor_from_bytes(d.message.hidden.dtype, d.message.hidden.shape, d.payload)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20, help="calls per repeat (the repeat's figure is their mean)")
    ap.add_argument("--quick", action="store_true", help="one repeat of one call (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.inner = 1, 1
    torch.set_num_threads(1)
    print_machine()
    fns = {"protobuf": protobuf_round_trip, "framed": framed_round_trip}
    print(f"{'hidden [U, D] bf16':>20} {'MB':>6} {'protobuf us':>22} {'framed us':>22} {'ratio':>6}")
    for u, d in SIZES:
        x = torch.randn(u, d).to(torch.bfloat16)
        for fn in fns.values():
            assert torch.equal(fn(x), x)
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    fn(x)
                times[name].append((time.perf_counter() - t0) / args.inner * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        cell = {k: f"{med[k]:.0f} ({min(v):.0f}-{max(v):.0f})" for k, v in times.items()}
        print(f"{str([u, d]):>20} {x.numel() * 2 / 1e6:6.2f} {cell['protobuf']:>22} {cell['framed']:>22} "
              f"{med['framed'] / med['protobuf']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
