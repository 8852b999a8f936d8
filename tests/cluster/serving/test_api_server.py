"""The public inference API over real sockets: a real engine on a tiny checkpoint behind grpc.aio."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from moeyard.attention.async_engine import AsyncEngine, EngineFailed
from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import RequestOutput, SamplingParams
from moeyard.client import AsyncMoeyardClient, MoeyardClient, MoeyardError, resolve_token
from moeyard.cluster.serving.api_server import ApiServer
from moeyard.v1 import inference_pb2 as pb
from moeyard.v1 import inference_pb2_grpc as pb_grpc
from tests.cluster.serving.api_harness import ApiServerThread, LocalEngineBackend

TOKEN = "test-token-7f3a9c0e51"
MAX_LEN = 2048
PROMPT = [5, 17, 99, 250, 3, 42]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- helpers (test_cli_addr.py uses them too) --------------------------------------------

def make_tiny_model(out_dir: Path, tokenizer: bool = True) -> Path:
    """A 2-layer, 4-expert Mixtral in float32 with a 512-token BPE tokenizer."""
    from moeyard.model.make_model import make_model
    from moeyard.model.make_model_options import MakeModelOptions

    make_model(MakeModelOptions(family="mixtral", layers=2, hidden=64, intermediate=64, experts=4, top_k=2,
                                heads=4, kv_heads=2, vocab=512, max_position_embeddings=MAX_LEN,
                                dtype="float32", seed=7), out_dir)
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out_dir / name).unlink(missing_ok=True)
    return out_dir


@dataclass
class Served:
    engine: LLMEngine
    async_engine: AsyncEngine
    thread: ApiServerThread
    aborted: list[tuple[str, int]] = field(default_factory=list)
    """``(request id, output tokens it had)`` for every running request the engine aborted."""

    @property
    def addr(self) -> str:
        return self.thread.address

    def close(self) -> None:
        self.thread.stop(grace=0.5)
        self.async_engine.shutdown()


def serve_engine(model_dir: Path, *, max_waiting: int = 256, **serve_kwargs) -> Served:
    engine = LLMEngine(model_dir, EngineConfig(dtype="float32"))
    ae = AsyncEngine(engine, max_waiting=max_waiting)
    serve_kwargs.setdefault("auth_token", TOKEN)
    try:
        thread = ApiServerThread.start(LocalEngineBackend(ae), engine.tokenizer, **serve_kwargs)
    except BaseException:
        ae.shutdown()
        raise
    served = Served(engine, ae, thread)
    abort = engine.abort

    def recording_abort(request_id: str) -> None:  # on the engine's thread, before the request leaves it
        seq = engine._seqs.get(request_id)
        if seq is not None and not seq.finished:
            served.aborted.append((request_id, len(seq.output_token_ids)))
        abort(request_id)

    engine.abort = recording_abort
    return served


def wait_aborted(served: Served, since: int, timeout: float = 30.0) -> list[tuple[str, int]]:
    """The engine's aborts after the first ``since``, once there is one (fails after a generous ``timeout``)."""
    deadline = time.monotonic() + timeout
    while len(served.aborted) <= since:
        assert time.monotonic() < deadline, f"no request was aborted within {timeout}s"
        time.sleep(0.01)
    return served.aborted[since:]


def wait_idle(ae: AsyncEngine, timeout: float = 30.0) -> float:
    """Seconds until the engine has no running or waiting request (fails after a generous ``timeout``)."""
    t0 = time.perf_counter()
    while True:
        s = ae.stats()
        if s.running == 0 and s.waiting == 0:
            return time.perf_counter() - t0
        assert time.perf_counter() - t0 < timeout, f"engine still busy after {timeout}s: {s}"
        time.sleep(0.01)


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("api") / "mixtral")


@pytest.fixture(scope="module")
def ref(model_dir) -> LLMEngine:
    """A second engine on the same checkpoint, stepped synchronously (the reference)."""
    return LLMEngine(model_dir, EngineConfig(dtype="float32"))


@pytest.fixture(scope="module")
def served(model_dir):
    s = serve_engine(model_dir)
    yield s
    s.close()


@pytest.fixture
def client(served, monkeypatch, tmp_path):
    monkeypatch.delenv("MOEYARD_API_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with MoeyardClient(served.addr, token=TOKEN, timeout=30) as c:
        yield c


@pytest.fixture
def raw(served):
    """A bare stub (no token unless a test sends one)."""
    with grpc.insecure_channel(served.addr) as ch:
        yield pb_grpc.InferenceStub(ch), ch


def auth(token: str = TOKEN):
    return (("authorization", f"Bearer {token}"),)


def assert_still_serving(client: MoeyardClient, ref: LLMEngine) -> None:
    r = client.generate_all([7, 8, 9], max_new_tokens=4, ignore_eos=True)
    assert r.token_ids == ref.generate([[7, 8, 9]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert r.finish_reason == "length"


# -- generation -------------------------------------------------------------------------

def test_generate_streams_greedy_tokens(client, ref):
    expected = ref.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    chunks = list(client.generate(PROMPT, max_new_tokens=24, ignore_eos=True))
    assert len(chunks) >= 3
    assert [t for c in chunks for t in c.token_ids] == expected
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 24)
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id
    assert "".join(c.text for c in chunks) == ref.tokenizer.decode(expected)


def test_request_id_in_responses_and_trailers(raw):
    stub, _ = raw
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=3,
                                            request_id="client-id-1"), metadata=auth(), timeout=30)
    resps = list(call)
    assert {r.request_id for r in resps} == {"client-id-1"}
    assert dict(call.trailing_metadata())["x-request-id"] == "client-id-1"
    # a generated id when the client sends none, also on errors
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=2),
                         metadata=auth(), timeout=30)
    resps = list(call)
    assert resps[0].request_id and dict(call.trailing_metadata())["x-request-id"] == resps[0].request_id
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), metadata=auth(), timeout=30))
    assert ei.value.code() == INVALID
    assert dict(ei.value.trailing_metadata())["x-request-id"]


def test_text_prompt(client, ref):
    text = "the router picks experts"
    ids = ref.tokenizer.encode(text)
    expected = ref.generate([ids], SamplingParams(max_tokens=16))[0]
    r = client.generate_all(text, max_new_tokens=16)
    assert r.usage.prompt_tokens == len(ids)
    assert r.token_ids == expected
    assert r.text == ref.tokenizer.decode(r.token_ids)
    assert r.finish_reason in ("stop", "length")


def test_stop_string_cuts_text(client, ref):
    full = client.generate_all(PROMPT, max_new_tokens=40, ignore_eos=True)
    text = full.text
    assert text == ref.tokenizer.decode(full.token_ids)
    # a 3-character stop whose first occurrence is in the second half of the text
    cut, stop = next((i, text[i:i + 3]) for i in range(len(text) // 2, len(text) - 3)
                     if "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i)
    r = client.generate_all(PROMPT, max_new_tokens=40, ignore_eos=True, stop=["never-there", stop])
    assert r.finish_reason == "stop"
    assert r.text == text[:cut]
    assert stop not in r.text
    assert r.token_ids == full.token_ids[:len(r.token_ids)] and 1 < len(r.token_ids) < 40
    assert r.usage.completion_tokens == len(r.token_ids)


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("pieces,stops,deltas,stopped", [
    (["xa", "b", "c", "d"], ["abc"], ["x", "", ""], True),       # stop across pieces: held back, then cut
    (["xab", "d", "e"], ["abc"], ["x", "abd", "e"], False),       # a false start is released
    (["xaa", "ab"], ["aab"], ["x", "a"], True),
    (["hello ", "world"], ["o w", "ll"], ["he"], True),          # earliest stop wins
    (["abc"], [], ["abc"], False),
])
def test_text_stream_holds_back_possible_stops(pieces, stops, deltas, stopped):
    from moeyard.cluster.serving.api_server import _TextStream

    ts = _TextStream(CharTokenizer(), stops)
    got, hit = [], False
    for i, p in enumerate(pieces):
        d, hit = ts.push([ord(c) for c in p], final=i == len(pieces) - 1)
        got.append(d)
        if hit:
            break
    assert (got, hit) == (deltas, stopped)


def test_stop_token_ids(client, ref):
    full = client.generate_all(PROMPT, max_new_tokens=12, ignore_eos=True)
    stop_tok = full.token_ids[5]
    r = client.generate_all(PROMPT, max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_tok])
    first = full.token_ids.index(stop_tok)
    assert r.token_ids == full.token_ids[:first + 1] and r.finish_reason == "stop"


def test_model_info(client, ref):
    info = client.model_info()
    total, active = ref.spec.total_and_active_params()
    assert info["family"] == "mixtral"
    assert (info["vocab_size"], info["max_model_len"], info["num_layers"], info["num_moe_layers"]) == (
        512, MAX_LEN, 2, 2)
    assert (info["num_experts"], info["top_k"]) == (4, 2)
    assert (info["total_params"], info["active_params"]) == (total, active) and active < total
    assert info["dtype"] == "float32" and info["has_tokenizer"] is True
    assert info["max_new_tokens_limit"] == 4096
    assert (info["num_expert_shards"], info["num_attention_replicas"]) == (1, 1)


def test_health_and_reflection_are_open(served):
    with grpc.insecure_channel(served.addr) as ch:  # no token
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "moeyard.v1.Inference"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"moeyard.v1.Inference", "grpc.health.v1.Health"} <= services
        svc = DescriptorPool(db).FindServiceByName("moeyard.v1.Inference")
        assert {m.name for m in svc.methods} == {"Generate", "ModelInfo"}
    with MoeyardClient(served.addr, token="") as c:
        assert c.health() == "SERVING"


# -- auth -------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [(), auth("wrong-" + TOKEN), (("authorization", TOKEN),),
                                      (("authorization", "Basic " + TOKEN),)],
                         ids=["missing", "wrong", "no-scheme", "basic"])
def test_auth_required(raw, client, ref, metadata):
    stub, _ = raw
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=2),
                           metadata=metadata, timeout=10))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in ei.value.details() and "token" in ei.value.details().lower()
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in ei.value.details()
    assert_still_serving(client, ref)


def test_client_wrong_token_raises(served):
    with MoeyardClient(served.addr, token="nope-nope") as c:
        with pytest.raises(MoeyardError) as ei:
            c.generate_all(PROMPT, max_new_tokens=2)
    assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED and "nope" not in ei.value.message
    assert str(ei.value).startswith("UNAUTHENTICATED: ")


def test_resolve_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MOEYARD_API_TOKEN", raising=False)
    assert resolve_token() is None
    (tmp_path / ".moeyard").mkdir()
    (tmp_path / ".moeyard" / "token").write_text("from-file\n")
    assert resolve_token() == "from-file"
    monkeypatch.setenv("MOEYARD_API_TOKEN", "from-env")
    assert resolve_token() == "from-env"
    assert resolve_token("explicit") == "explicit"


def test_auth_is_required_unless_disabled():
    with pytest.raises(ValueError, match="require_auth=False"):
        ApiServer(object(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        ApiServer(object(), None, auth_token="")  # type: ignore[arg-type]


# -- bad input --------------------------------------------------------------------------

BAD = {
    "empty-token-ids": (dict(prompt=[]), "prompt"),
    "empty-text": (dict(prompt=""), "prompt"),
    "over-context": (dict(prompt=[5] * MAX_LEN), "context"),
    "token-out-of-range": (dict(prompt=[1, 512]), "token id"),
    "negative-temperature": (dict(temperature=-0.5), "temperature"),
    "nan-temperature": (dict(temperature=math.nan), "temperature"),
    "inf-top-p": (dict(top_p=math.inf), "top_p"),
    "top-p-0": (dict(top_p=0.0), "top_p"),
    "top-p-1.5": (dict(top_p=1.5), "top_p"),
    "max-new-tokens-0": (dict(max_new_tokens=0), "max_new_tokens"),
    "max-new-tokens-over-limit": (dict(max_new_tokens=4097), "max_new_tokens"),
    "negative-top-k": (dict(top_k=-1), "top_k"),
    "empty-stop": (dict(stop=[""]), "stop"),
    "bad-request-id": (dict(request_id="has space"), "request_id"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_invalid_argument(client, ref, case):
    kw, needle = BAD[case]
    kw = {"prompt": PROMPT, "max_new_tokens": 4, **kw}
    with pytest.raises(MoeyardError) as ei:
        client.generate_all(kw.pop("prompt"), **kw)
    assert ei.value.code == INVALID, ei.value
    assert needle in ei.value.message, ei.value.message
    if case != "bad-request-id":
        assert ei.value.request_id
    assert_still_serving(client, ref)


@pytest.fixture(scope="module")
def served_no_tokenizer(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("api-notok") / "mixtral"
    shutil.copytree(model_dir, d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)
    s = serve_engine(d)
    assert s.engine.tokenizer is None
    yield s
    s.close()


def test_text_prompt_without_tokenizer(served_no_tokenizer, ref):
    with MoeyardClient(served_no_tokenizer.addr, token=TOKEN, timeout=30) as c:
        with pytest.raises(MoeyardError) as ei:
            c.generate_all("hello", max_new_tokens=2)
        assert ei.value.code == INVALID and "no tokenizer" in ei.value.message
        assert "token_ids" in ei.value.message
        with pytest.raises(MoeyardError) as ei:
            c.generate_all(PROMPT, max_new_tokens=2, stop=["x"])
        assert ei.value.code == INVALID and "stop" in ei.value.message
        r = c.generate_all(PROMPT, max_new_tokens=6, ignore_eos=True)  # token ids are served
        assert r.token_ids == ref.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))[0]
        assert r.text == ""
        assert c.model_info()["has_tokenizer"] is False


def test_queue_full_is_resource_exhausted(model_dir, client, ref):
    full = serve_engine(model_dir, max_waiting=0)
    try:
        with MoeyardClient(full.addr, token=TOKEN, timeout=30) as c:
            with pytest.raises(MoeyardError) as ei:
                c.generate_all(PROMPT, max_new_tokens=2)
        assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in ei.value.message
    finally:
        full.close()
    assert_still_serving(client, ref)


# -- cancellation -----------------------------------------------------------------------

def test_deadline_aborts_engine_request(served, client, ref):
    since = len(served.aborted)
    with pytest.raises(MoeyardError) as ei:
        client.generate_all([1, 2, 3], max_new_tokens=MAX_LEN - 8, ignore_eos=True, timeout=0.3)
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # the engine stopped the request part way (it did not run its ~2000 tokens to the end)
    assert all(produced < MAX_LEN - 8 for _, produced in wait_aborted(served, since))
    wait_idle(served.async_engine)
    assert_still_serving(client, ref)


def test_client_cancel_aborts_engine_request(served, client, ref):
    stream = client.generate([1, 2, 3], max_new_tokens=MAX_LEN - 8, ignore_eos=True)
    got = [next(stream), next(stream)]
    assert all(c.token_ids for c in got)
    since = len(served.aborted)
    stream.close()  # cancels the call
    assert any(2 <= produced < MAX_LEN - 8 for _, produced in wait_aborted(served, since))
    wait_idle(served.async_engine)
    assert_still_serving(client, ref)


# -- a scripted backend: engine failures and bugs ----------------------------------------

class ScriptedBackend:
    """First prompt token picks the behaviour: 1 = fail mid-stream, 2 = bug, 3 = bug in model_info."""

    def __init__(self):
        self.closed: list[str] = []

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        try:
            kind = prompt_token_ids[0]
            if kind == 2:
                raise KeyError("boom")
            yield RequestOutput(request_id, [11], False)
            if kind == 1:
                raise EngineFailed("experts of shard 1 unreachable")
            yield RequestOutput(request_id, [12], True, "length", len(prompt_token_ids), 2)
        finally:
            self.closed.append(request_id)

    async def model_info(self) -> dict:
        return {"family": "scripted", "num_expert_shards": 3, "not_a_field": 1}


@pytest.fixture(scope="module")
def scripted():
    backend = ScriptedBackend()
    t = ApiServerThread.start(backend, None, auth_token=None, require_auth=False, max_new_tokens_limit=8)
    yield backend, t.address
    t.stop()


def test_backend_errors_map_to_codes(scripted):
    backend, addr = scripted
    with MoeyardClient(addr, token=None, timeout=10) as c:  # auth disabled on purpose
        with pytest.raises(MoeyardError) as ei:
            c.generate_all([1, 5], max_new_tokens=2)
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE and "shard 1 unreachable" in ei.value.message
        with pytest.raises(MoeyardError) as ei:
            c.generate_all([2, 5], max_new_tokens=2)
        assert ei.value.code == grpc.StatusCode.INTERNAL and "KeyError" in ei.value.message
        assert ei.value.request_id in ei.value.message
        with pytest.raises(MoeyardError) as ei:
            c.generate_all([3], max_new_tokens=9)
        assert ei.value.code == INVALID and "<= 8" in ei.value.message
        r = c.generate_all([3, 5], max_new_tokens=2, request_id="after-errors")
        assert (r.token_ids, r.finish_reason, r.request_id) == ([11, 12], "length", "after-errors")
        assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 2
        info = c.model_info()
        assert info["family"] == "scripted" and info["num_expert_shards"] == 3
        assert info["has_tokenizer"] is False and info["max_new_tokens_limit"] == 8
    assert "after-errors" in backend.closed


def _self_signed_cert() -> tuple[bytes, bytes]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_tls(monkeypatch, tmp_path):
    key, cert = _self_signed_cert()
    creds = grpc.ssl_server_credentials([(key, cert)])
    t = ApiServerThread.start(ScriptedBackend(), None, auth_token=TOKEN, server_credentials=creds)
    try:
        with MoeyardClient(t.address, token=TOKEN, timeout=10, tls_root_certs=cert) as c:
            assert c.generate_all([3], max_new_tokens=2).token_ids == [11, 12]
            assert c.health() == "SERVING"
        with MoeyardClient(t.address, token="bad", timeout=10, tls_root_certs=cert) as c:
            with pytest.raises(MoeyardError) as ei:
                c.model_info()
            assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
        with MoeyardClient(t.address, token=TOKEN, timeout=3) as c:  # plaintext to a TLS port fails
            with pytest.raises(MoeyardError) as ei:
                c.model_info()
            assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        t.stop()


# -- async client -----------------------------------------------------------------------

def test_async_client(served, ref):
    expected = ref.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))[0]

    async def main():
        async with AsyncMoeyardClient(served.addr, token=TOKEN, timeout=30) as c:
            assert await c.health() == "SERVING"
            chunks = [ch async for ch in c.generate(PROMPT, max_new_tokens=10, ignore_eos=True)]
            assert [t for ch in chunks for t in ch.token_ids] == expected and len(chunks) > 1
            r = await c.generate_all(PROMPT, max_new_tokens=10, ignore_eos=True, request_id="async-1")
            assert (r.token_ids, r.finish_reason, r.request_id) == (expected, "length", "async-1")
            assert r.text == ref.tokenizer.decode(expected)
            assert (await c.model_info())["family"] == "mixtral"
            # a second call with an id still in flight is refused
            long = c.generate([1, 2, 3], max_new_tokens=MAX_LEN - 8, ignore_eos=True, request_id="dup")
            await long.__anext__()
            with pytest.raises(MoeyardError) as ei:
                await c.generate_all(PROMPT, max_new_tokens=2, request_id="dup")
            assert ei.value.code == grpc.StatusCode.ALREADY_EXISTS
            await long.aclose()
            with pytest.raises(MoeyardError) as ei:
                await c.generate_all(PROMPT, max_new_tokens=2, timeout=0.0001)
            assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        async with AsyncMoeyardClient(served.addr, token="bad") as c:
            with pytest.raises(MoeyardError) as ei:
                await c.model_info()
            assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(main())
    wait_idle(served.async_engine)
