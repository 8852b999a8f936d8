"""The placement, its epoch, replica acknowledgements and autoscaler events in Redis.

Key layout (``P`` = the cluster's key prefix, see :class:`moeyard.cluster.settings.redis.RedisSettings`):

``P:placement``            hash: ``epoch``, ``num_shards``, ``shape`` ("L,P"), ``phy2log`` (raw
                           little-endian int32 bytes of ``[L, P]``), ``fingerprint`` (what the
                           placement is for: model, dtype, slots), ``updated`` (unix time).
                           Written with one HSET, so readers never see half a placement.
``P:replica:{id}``         string: the epoch replica ``id`` routes with; set every poll with a
                           TTL, so a dead replica drops out of the acknowledgement wait.
``P:events``               list of JSON objects, newest first, trimmed to ``MAX_EVENTS``.

A restarted component (shard manager, shard, replica, autoscaler) reads ``P:placement``
to recover the placement and epoch instead of starting over from the static one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from moeyard.router_service.placement import Placement

MAX_EVENTS = 1000
REPLICA_TTL_S = 10


def placement_key(prefix: str) -> str:
    return f"{prefix}:placement"


def replica_key(prefix: str, replica_id: str) -> str:
    return f"{prefix}:replica:{replica_id}"


def events_key(prefix: str) -> str:
    return f"{prefix}:events"


@dataclass(frozen=True)
class StoredPlacement:
    placement: Placement
    fingerprint: str
    updated: float


def encode_placement(placement: Placement, fingerprint: str) -> dict[str, bytes | str | int]:
    """The hash fields of :func:`placement_key` for ``placement``."""
    L, P = placement.phy2log.shape
    return {"epoch": placement.epoch, "num_shards": placement.num_shards, "shape": f"{L},{P}",
            "phy2log": placement.phy2log.to(torch.int32).numpy().astype("<i4").tobytes(),
            "fingerprint": fingerprint, "updated": repr(time.time())}


def decode_placement(fields: dict) -> StoredPlacement:
    """Inverse of :func:`encode_placement` (keys/values as bytes, as redis-py returns them)."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    try:
        L, P = (int(x) for x in f["shape"].decode().split(","))
        raw = f["phy2log"]
        if len(raw) != 4 * L * P:
            raise ValueError(f"phy2log holds {len(raw)} bytes, shape {L}x{P} needs {4 * L * P}")
        p2l = torch.frombuffer(bytearray(raw), dtype=torch.int32).view(L, P).to(torch.int64)
        placement = Placement(p2l, int(f["num_shards"]), int(f["epoch"]))
        return StoredPlacement(placement, f.get("fingerprint", b"").decode(), float(f.get("updated", b"0")))
    except (KeyError, ValueError) as e:
        raise ValueError(f"stored placement is malformed: {e}") from None


def read_placement(client, prefix: str) -> StoredPlacement | None:
    """The stored placement, or ``None`` if there is none."""
    fields = client.hgetall(placement_key(prefix))
    return decode_placement(fields) if fields else None


def read_epoch(client, prefix: str) -> int | None:
    """Just the stored epoch (one small read: what replicas poll)."""
    v = client.hget(placement_key(prefix), "epoch")
    return int(v) if v is not None else None


def write_placement(client, prefix: str, placement: Placement, fingerprint: str) -> None:
    client.hset(placement_key(prefix), mapping=encode_placement(placement, fingerprint))


def ack_epoch(client, prefix: str, replica_id: str, epoch: int, ttl_s: int = REPLICA_TTL_S) -> None:
    """Replica ``replica_id`` routes with ``epoch`` from its next step on (heartbeat too)."""
    client.set(replica_key(prefix, replica_id), int(epoch), ex=ttl_s)


def replica_epochs(client, prefix: str) -> dict[str, int]:
    """Live replicas (heartbeat within the TTL) -> the epoch each routes with."""
    keys = list(client.scan_iter(match=replica_key(prefix, "*"), count=100))
    if not keys:
        return {}
    vals = client.mget(keys)
    head = len(replica_key(prefix, ""))
    return {k.decode()[head:]: int(v) for k, v in zip(keys, vals) if v is not None}


def forget_replica(client, prefix: str, replica_id: str) -> None:
    client.delete(replica_key(prefix, replica_id))


@dataclass
class Event:
    """One autoscaler decision, for logs, ``moeyard status`` and the dashboard."""

    kind: str
    """``rebalance`` | ``scale_up`` | ``scale_down`` (``*_failed``) | ``skip`` | ``reconcile`` | ``republish``."""
    reason: str
    time: float = field(default_factory=time.time)
    epoch_before: int | None = None
    epoch_after: int | None = None
    balancedness_before: float | None = None
    balancedness_after: float | None = None
    """Predicted (for a plan) from the smoothed load; measured values come from the load windows."""
    duration_s: float | None = None
    slots_moved: int | None = None
    bytes_loaded: int | None = None


def push_event(client, prefix: str, event: Event) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.lpush(events_key(prefix), json.dumps(asdict(event)))
    pipe.ltrim(events_key(prefix), 0, MAX_EVENTS - 1)
    pipe.execute()


def read_events(client, prefix: str, limit: int = 100) -> list[dict]:
    """Newest first."""
    return [json.loads(x) for x in client.lrange(events_key(prefix), 0, max(0, limit - 1))]
