"""Token deltas replica -> ingress on one stream per replica (cluster/serving/output_sink.py), over real loopback gRPC.

The replica end is the real ``AttentionReplica.generate`` (called on a stand-in
holding a scripted engine), the ingress end the real ``ServeBackend`` with a
real ``OutputSink``; only Ray Serve's handle between them is replaced by a
direct call.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from moeyard.attention.sequence import RequestOutput, SamplingParams
from moeyard.cluster.config import ClusterConfig
from moeyard.cluster.serving.attention_replica import AttentionReplica
from moeyard.cluster.serving.output_sink import METHOD, SECRET_HEADER, OutputSink, SinkPusher, SinkSpec, SinkTarget
from moeyard.cluster.serving.replica_metrics import ReplicaMetrics
from moeyard.cluster.serving.replica_stream import StepTokens, StreamError, StreamErrorCode
from moeyard.cluster.serving.serve_backend import ServeBackend, _Merge
from moeyard.model.spec import ModelSpec
from moeyard.v1 import outputs_pb2 as pb

STEPS = 12


def _tokens(rid: str) -> list[int]:
    base = 100 * (int(rid.rsplit("-", 1)[1]) + 1)
    return [base + i for i in range(STEPS)]


class _ScriptedEngine:
    """Yields one token per 'step' (every 5 ms, all requests in the same loop turn, like the engine)."""

    async def generate(self, request_id, prompt_token_ids, params):
        toks = _tokens(request_id)
        for i, t in enumerate(toks):
            await asyncio.sleep(0.005)
            done = i == len(toks) - 1
            yield RequestOutput(request_id, [t], done, "length" if done else None, len(prompt_token_ids), i + 1)


class _Replica:
    """What ``AttentionReplica.generate`` reads from ``self``."""

    _sink_pusher = AttentionReplica.func_or_class._sink_pusher

    def __init__(self):
        self.engine = _ScriptedEngine()
        self.metrics = ReplicaMetrics()
        self.pusher = None
        self.cfg = ClusterConfig()


class _Call:
    """A Serve streaming call made directly: counts the items that crossed it."""

    def __init__(self, agen, counter: list[int]):
        self.agen, self.counter, self.cancelled = agen, counter, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.agen.__anext__()
        self.counter.append(1)
        return item

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, replica: _Replica, spec_override: dict | None = None):
        self.replica, self.items, self.calls = replica, [], []
        self.spec_override = spec_override
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, rid, prompt, params, sink=None):
        if sink is not None and self.spec_override is not None:
            sink = SinkTarget(dataclasses.replace(sink.sink, **self.spec_override), sink.key)
        call = _Call(AttentionReplica.func_or_class.generate(self.replica, rid, prompt, params, sink), self.items)
        self.calls.append(call)
        return call


def _backend(handle, sink) -> ServeBackend:
    return ServeBackend(handle, None, ModelSpec.__new__(ModelSpec), ClusterConfig(), sink=sink)


async def _collect(backend, rid) -> list[RequestOutput]:
    return [out async for out in backend.generate(rid, [1, 2, 3], SamplingParams(max_tokens=STEPS))]


async def _run(n_requests: int, handle_kw=None, with_sink: bool = True):
    sink = OutputSink()
    await sink.start()
    replica = _Replica()
    handle = _Handle(replica, **(handle_kw or {}))
    backend = _backend(handle, sink if with_sink else None)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*[_collect(backend, f"r-{i}") for i in range(n_requests)]), 30)
    finally:
        if replica.pusher is not None:
            await replica.pusher.close()
        await sink.stop(0)
    return results, sink, handle


def _check(results):
    for i, outs in enumerate(results):
        assert [t for o in outs for t in o.new_token_ids] == _tokens(f"r-{i}")
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
        assert [o.num_output_tokens for o in outs][-1] == STEPS


def test_deltas_cross_batched_per_step_and_the_serve_call_carries_only_the_last_item():
    results, sink, handle = asyncio.run(_run(4))
    _check(results)
    assert len(handle.items) == 4  # one (final) item per request on the Serve calls
    assert sink.deltas == 4 * (STEPS - 1)
    # one message per step for all four requests (a few more when a step straddles loop turns)
    assert sink.batches <= 2 * (STEPS - 1) and sink.batches < sink.deltas
    assert all(len(o.new_token_ids) == 1 for outs in results for o in outs)  # streamed, not bunched at the end


def test_without_a_sink_deltas_come_on_the_serve_calls():
    results, sink, handle = asyncio.run(_run(3, with_sink=False))
    _check(results)
    assert len(handle.items) == 3 * STEPS and sink.deltas == 0


def test_an_unusable_sink_falls_back_to_the_serve_calls_without_losing_or_repeating_tokens():
    # wrong secret: the sink refuses the stream; the replica notices and sends the rest on the Serve call
    results, sink, handle = asyncio.run(_run(3, handle_kw={"spec_override": {"secret": "wrong"}}))
    _check(results)
    assert sink.deltas == 0
    assert len(handle.items) > 3  # deltas came on the Serve calls


def test_an_unreachable_sink_falls_back_too():
    async def go():
        sink = OutputSink()
        await sink.start()
        await sink.stop(0)  # nothing listens there any more
        replica = _Replica()
        handle = _Handle(replica)
        backend = _backend(handle, sink)
        try:
            results = await asyncio.wait_for(asyncio.gather(*[_collect(backend, f"r-{i}") for i in range(2)]), 30)
        finally:
            await replica.pusher.close()
        return results, handle
    results, handle = asyncio.run(go())
    _check(results)


def test_deltas_are_keyed_by_the_ingress_not_by_the_clients_request_id():
    # two streams under the same client request id (as two ingresses, or a replayed id) get
    # separate keys: neither can receive the other's tokens
    async def go():
        sink = OutputSink()
        await sink.start()
        (k1, q1), (k2, q2) = sink.open(), sink.open()
        pusher = SinkPusher()
        assert k1 != k2 and len(k1) >= 24
        pusher.push(sink.spec(), k1, 0, [1])
        pusher.push(sink.spec(), k2, 0, [2])
        for _ in range(100):
            if sink.deltas == 2:
                break
            await asyncio.sleep(0.01)
        await pusher.close()
        await sink.stop(0)
        return q1.get_nowait().token_ids, q2.get_nowait().token_ids
    assert asyncio.run(go()) == ([1], [2])


def test_a_cancelled_request_stops_taking_deltas_and_cancels_its_call():
    async def go():
        sink = OutputSink()
        await sink.start()
        replica = _Replica()
        handle = _Handle(replica)
        backend = _backend(handle, sink)
        stream = backend.generate("r-0", [1, 2], SamplingParams(max_tokens=STEPS))
        first = await asyncio.wait_for(stream.__anext__(), 10)
        await stream.aclose()
        open_queues = dict(sink._queues)
        await replica.pusher.close()
        await sink.stop(0)
        return first, open_queues, handle
    first, open_queues, handle = asyncio.run(go())
    assert first.new_token_ids == _tokens("r-0")[:1]
    assert open_queues == {} and handle.calls[0].cancelled


def _raw_stream(address: str, metadata, messages: list[bytes]):
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_unary(METHOD, request_serializer=lambda b: b, response_deserializer=pb.DeliverReply.FromString)
        return call(iter(messages), metadata=metadata, timeout=10)


@pytest.mark.parametrize("metadata", [(), ((SECRET_HEADER, "nope"),)])
def test_sink_refuses_a_stream_without_its_secret(metadata):
    async def go():
        sink = OutputSink()
        await sink.start()
        key, q = sink.open()
        msg = pb.OutputBatch(deltas=[pb.TokenDelta(key=key, offset=0, token_ids=[7])]).SerializeToString()
        try:
            with pytest.raises(grpc.RpcError) as e:
                await asyncio.to_thread(_raw_stream, sink.address, metadata, [msg])
        finally:
            await sink.stop(0)
        return e.value, q.qsize()
    err, queued = asyncio.run(go())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and SECRET_HEADER in err.details()
    assert queued == 0


def test_sink_refuses_malformed_messages_and_keeps_serving():
    async def go():
        sink = OutputSink()
        await sink.start()
        key, q = sink.open()
        good = pb.OutputBatch(deltas=[pb.TokenDelta(key=key, offset=0, token_ids=[7, 8]),
                                      pb.TokenDelta(key="r-0", offset=0, token_ids=[9])])  # not a key: dropped
        try:
            with pytest.raises(grpc.RpcError) as e:
                await asyncio.to_thread(_raw_stream, sink.address, ((SECRET_HEADER, sink.secret),),
                                        [b"\xff\xff\xff"])
            reply = await asyncio.to_thread(_raw_stream, sink.address, ((SECRET_HEADER, sink.secret),),
                                            [good.SerializeToString()])
            # a delta for a request that has ended is late, not dropped
            sink.close(key)
            late = pb.OutputBatch(deltas=[pb.TokenDelta(key=key, offset=2, token_ids=[10])])
            await asyncio.to_thread(_raw_stream, sink.address, ((SECRET_HEADER, sink.secret),),
                                    [late.SerializeToString()])
        finally:
            await sink.stop(0)
        return e.value, reply, q.get_nowait(), sink.dropped, sink.late
    err, reply, delta, dropped, late = asyncio.run(go())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "OutputBatch" in err.details()
    assert reply.batches == 1 and delta.offset == 0 and delta.token_ids == [7, 8] and dropped == 1
    assert late == 1


def test_pusher_sends_one_message_per_loop_turn():
    async def go():
        sink = OutputSink()
        await sink.start()
        opened = [sink.open() for _ in range(5)]
        queues = [q for _, q in opened]
        pusher = SinkPusher()
        spec = sink.spec()
        for turn in range(3):
            for i in range(5):
                assert pusher.push(spec, opened[i][0], turn, [10 * i + turn])
            await asyncio.sleep(0.05)
        await pusher.close()
        for _ in range(100):
            if sink.deltas == 15:
                break
            await asyncio.sleep(0.01)
        await sink.stop(0)
        return sink, [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
    sink, got = asyncio.run(go())
    assert sink.deltas == 15 and sink.batches == 3
    for i, deltas in enumerate(got):
        assert [(d.offset, d.token_ids) for d in deltas] == [(t, [10 * i + t]) for t in range(3)]


def test_spec_hides_the_secret_in_repr():
    spec = SinkSpec("127.0.0.1:1", "s3cret")
    target = spec.target("k1")
    assert target == SinkTarget(spec, "k1") and target.sink is spec and target.key == "k1"
    assert "s3cret" not in repr(spec) and "s3cret" not in repr(target)


def test_merge_passes_every_token_once_in_order():
    m = _Merge("r", 3)
    assert m.delta(0, [1, 2]).new_token_ids == [1, 2]
    assert m.delta(1, [2, 3]).new_token_ids == [3]          # overlap: only the new part
    assert m.delta(0, [1]) is None                          # a repeat
    assert m.delta(5, [6]) is None                          # a gap: wait for the final item
    assert m.item(StepTokens([1, 2, 3, 4], 0)).new_token_ids == [4]
    last = m.item(StepTokens([7], 6, True, "length", prompt_tokens=3, completion_tokens=7,
                             output_token_ids=[1, 2, 3, 4, 5, 6, 7]))
    assert last.new_token_ids == [5, 6, 7] and last.finished and last.num_output_tokens == 7


def test_merge_reports_errors_of_the_serve_call():
    from moeyard.attention.async_engine import QueueFull

    with pytest.raises(QueueFull, match="capacity"):
        _Merge("r", 1).item(StreamError(StreamErrorCode.RESOURCE_EXHAUSTED, "at capacity"))
