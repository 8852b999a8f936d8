"""Hostile input to the public API, over real sockets: every malformed request gets the right
status code and a message naming the problem, and the server serves the next request normally.

One in-process API server over a real engine on the tiny checkpoint of ``test_api_server.py``
(vocabulary 512, context 2048 tokens, limit 4096 new tokens). Requests go through bare stubs,
or as hand-built wire bytes where a protobuf library would refuse to build them.

Behaviour this file pins down (decided here, see ``cluster/serving/api_server.py``):

* unknown fields are ignored and the request is served: protobuf's forward compatibility (a
  newer client may send fields an older server does not know); a field sent with the wrong wire
  type is an unknown field to protobuf, so the field keeps its default;
* bytes that do not parse (corrupt wire format, a string that is not UTF-8) are
  INVALID_ARGUMENT, not grpcio's UNKNOWN, and an unauthenticated caller gets UNAUTHENTICATED
  before its bytes are looked at;
* ``prompt + max_new_tokens`` over the context is served and stops at the context
  (finish_reason "length"), as ``max_model_len`` says ("prompt plus generated tokens");
* a temperature in (0, 1e-5) is greedy and a tiny ``top_p`` keeps the top token: both are what
  the values mean, and the sampler could not represent them (they failed every request of the
  engine step);
* ``stop_token_ids`` must be token ids of the model (at most 1024 of them); stop strings at most
  256 characters, so one longer than the context is refused;
* a prompt that cannot fit the context is refused without tokenizing or scanning it (a 60 MB
  text prompt used to block the server's event loop for minutes).
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.cluster.serving.api_server import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_NEW_TOKENS_LIMIT,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)
from moeyard.rpc import API_MAX_MESSAGE_BYTES
from moeyard.v1 import inference_pb2 as pb
from moeyard.v1 import inference_pb2_grpc as pb_grpc
from tests.cluster.serving.test_api_server import MAX_LEN, TOKEN, make_tiny_model, serve_engine, wait_idle

VOCAB = 512
PROMPT = [5, 17, 99, 250, 3, 42]
NORMAL = [7, 8, 9]
NORMAL_NEW = 4

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
GENERATE = "/moeyard.v1.Inference/Generate"
MODEL_INFO = "/moeyard.v1.Inference/ModelInfo"


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("hostile") / "mixtral")


@pytest.fixture(scope="module")
def ref(model_dir) -> LLMEngine:
    return LLMEngine(model_dir, EngineConfig(dtype="float32"))


@pytest.fixture(scope="module")
def served(model_dir):
    s = serve_engine(model_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def served_no_tokenizer(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-notok") / "mixtral"
    shutil.copytree(model_dir, d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)
    s = serve_engine(d)
    assert s.engine.tokenizer is None
    yield s
    s.close()


class Conn:
    """A channel to one server: the typed stub and raw (bytes in) callables."""

    def __init__(self, addr: str):
        self.channel = grpc.insecure_channel(addr)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.raw = {
            "Generate": self.channel.unary_stream(GENERATE, request_serializer=lambda b: b,
                                                  response_deserializer=pb.GenerateResponse.FromString),
            "ModelInfo": self.channel.unary_unary(MODEL_INFO, request_serializer=lambda b: b,
                                                  response_deserializer=pb.ModelInfoResponse.FromString),
        }

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def conns(served, served_no_tokenizer):
    c = {"tok": Conn(served.addr), "notok": Conn(served_no_tokenizer.addr)}
    yield c
    for conn in c.values():
        conn.close()


@pytest.fixture(scope="module")
def greedy(ref):
    """Reference greedy outputs (cached per prompt and length)."""
    cache: dict[tuple, list[int]] = {}

    def get(prompt: list[int], max_new: int, ignore_eos: bool = True) -> list[int]:
        key = (tuple(prompt), max_new, ignore_eos)
        if key not in cache:
            cache[key] = ref.generate([list(prompt)], SamplingParams(max_tokens=max_new, ignore_eos=ignore_eos))[0]
        return cache[key]

    return get


def auth(token: str = TOKEN):
    return (("authorization", f"Bearer {token}"),)


def assert_serves_normally(conn: Conn, greedy) -> None:
    """A normal request right after gets the reference engine's greedy tokens."""
    resps = list(conn.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=NORMAL), max_new_tokens=NORMAL_NEW,
                                                       ignore_eos=True), metadata=auth(), timeout=30))
    assert [t for r in resps for t in r.token_ids] == greedy(NORMAL, NORMAL_NEW)
    assert resps[-1].finish_reason == "length"


# -- building requests ---------------------------------------------------------------------

def req(prompt: list[int] | str | None = PROMPT, **kw) -> pb.GenerateRequest:
    """A GenerateRequest (4 new tokens unless told): a list is token ids, a str is text."""
    kw.setdefault("max_new_tokens", 4)
    r = pb.GenerateRequest(**kw)
    if isinstance(prompt, str):
        r.text = prompt
    elif prompt is not None:
        r.token_ids.SetInParent()
        r.token_ids.ids.extend(prompt)
    return r


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def wire(num: int, wire_type: int, payload: bytes | int) -> bytes:
    """One field on the wire: the tag, then a varint (type 0) or length-prefixed bytes (type 2)."""
    tag = _varint(num << 3 | wire_type)
    if wire_type == 0:
        return tag + _varint(payload)
    return tag + _varint(len(payload)) + payload


def good_bytes(**kw) -> bytes:
    return req(**kw).SerializeToString()


# -- the table -------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    make: Callable[[], pb.GenerateRequest | bytes]  # built when the case runs (some are big)
    code: grpc.StatusCode
    needle: str = ""  # a substring of the status details (error cases)
    metadata: tuple | None = None  # None: a valid bearer token
    server: str = "tok"  # "notok": the model without a tokenizer
    method: str = "Generate"
    check: Callable[..., None] | None = None  # check(responses, greedy) for OK cases
    timeout: float = 15.0


def tokens(resps) -> list[int]:
    return [t for r in resps for t in r.token_ids]


def is_greedy(prompt, max_new, ignore_eos=False):
    def check(resps, greedy):
        assert tokens(resps) == greedy(prompt, max_new, ignore_eos)
        assert resps[-1].finish_reason in ("stop", "length")
    return check


def sampled(max_new):
    def check(resps, greedy):
        ids = tokens(resps)
        assert len(ids) == max_new and all(0 <= t < VOCAB for t in ids)
        assert resps[-1].finish_reason == "length" and resps[-1].usage.completion_tokens == max_new
    return check


def clamped_at_context(resps, greedy):
    ids = tokens(resps)
    assert len(ids) == 3 and resps[-1].finish_reason == "length"
    assert (resps[-1].usage.prompt_tokens, resps[-1].usage.completion_tokens) == (MAX_LEN - 3, 3)


def echoes_request_id(rid):
    def check(resps, greedy):
        assert {r.request_id for r in resps} == {rid}
    return check


def model_info_ok(info, greedy):
    assert info.vocab_size == VOCAB and info.max_model_len == MAX_LEN


BIG_TEXT_CHARS = 60 << 20  # under the 64 MiB message limit, far over what 2048 tokens can cover

CASES = [
    # -- prompt ---------------------------------------------------------------------------
    Case("no-prompt", lambda: req(None), INVALID, "prompt is missing"),
    Case("empty-text", lambda: req(""), INVALID, "prompt is empty"),
    Case("empty-token-ids", lambda: req([]), INVALID, "prompt is empty"),
    Case("negative-token-id", lambda: req([5, -1]), INVALID, "token id -1 out of range [0, 512)"),
    Case("token-id-equals-vocab", lambda: req([5, VOCAB]), INVALID, "token id 512 out of range [0, 512)"),
    Case("token-id-int32-max", lambda: req([2**31 - 1]), INVALID, "token id 2147483647 out of range"),
    Case("token-id-int32-min", lambda: req([-2**31]), INVALID, "token id -2147483648 out of range"),
    Case("prompt-fills-context", lambda: req([5] * MAX_LEN), INVALID,
         f"prompt has {MAX_LEN} tokens; the maximum context is {MAX_LEN} tokens"),
    Case("prompt-over-context", lambda: req([5] * (MAX_LEN + 1)), INVALID, f"maximum context is {MAX_LEN} tokens"),
    Case("prompt-of-4m-ids", lambda: req([5] * 4_000_000), INVALID, "prompt has 4000000 tokens", timeout=10),
    Case("text-over-context", lambda: req("the router picks experts " * 2000), INVALID,
         f"cannot fit the maximum context of {MAX_LEN} tokens"),
    Case("text-of-60mb", lambda: req("a" * BIG_TEXT_CHARS), INVALID,
         f"text prompt has {BIG_TEXT_CHARS} characters", timeout=10),
    Case("text-without-tokenizer", lambda: req("hello"), INVALID, "no tokenizer", server="notok"),
    Case("prompt-plus-max-new-over-context", lambda: req([5] * (MAX_LEN - 3), max_new_tokens=100, ignore_eos=True),
         OK, check=clamped_at_context),
    # -- bytes that are not a valid message --------------------------------------------------
    Case("text-invalid-utf8", lambda: wire(1, 2, b"caf\xc3(\xff") + wire(3, 0, 2), INVALID, "UTF-8"),
    Case("request-id-invalid-utf8", lambda: good_bytes() + wire(11, 2, b"\xfe\xfe"), INVALID, "UTF-8"),
    Case("stop-invalid-utf8", lambda: good_bytes() + wire(8, 2, b"\xc0\x80"), INVALID, "UTF-8"),
    Case("garbage-bytes", lambda: b"\xff\xff\xff\xff\xff\xff", INVALID,
         "not a valid moeyard.v1.GenerateRequest message"),
    Case("truncated-message", lambda: good_bytes()[:-1], INVALID,
         "not a valid moeyard.v1.GenerateRequest message"),
    Case("field-number-0", lambda: b"\x00\x01" + good_bytes(), INVALID, "not a valid"),
    Case("length-past-the-end", lambda: wire(2, 2, b"\x08\x05")[:1] + _varint(1 << 20) + b"\x08\x05", INVALID,
         "not a valid"),
    Case("unknown-fields-are-ignored",
         lambda: good_bytes(prompt=PROMPT, max_new_tokens=5) + wire(100, 0, 7) + wire(101, 2, b"future field"),
         OK, check=is_greedy(PROMPT, 5)),
    Case("wrong-wire-type-is-an-unknown-field",  # max_new_tokens as bytes: unknown, so the default 16
         lambda: good_bytes(prompt=PROMPT, max_new_tokens=None) + wire(3, 2, b"\x05"), OK,
         check=is_greedy(PROMPT, DEFAULT_MAX_NEW_TOKENS)),
    Case("model-info-garbage", lambda: b"\x0a\xff", INVALID, "not a valid moeyard.v1.ModelInfoRequest message",
         method="ModelInfo"),
    Case("model-info-unknown-fields", lambda: wire(7, 0, 1) + wire(8, 2, b"x"), OK, method="ModelInfo",
         check=model_info_ok),
    # -- max_new_tokens --------------------------------------------------------------------------
    Case("max-new-tokens-0", lambda: req(max_new_tokens=0), INVALID, "max_new_tokens must be >= 1, got 0"),
    Case("max-new-tokens-negative", lambda: req(max_new_tokens=-5), INVALID, "max_new_tokens must be >= 1, got -5"),
    Case("max-new-tokens-int32-min", lambda: req(max_new_tokens=-2**31), INVALID, "got -2147483648"),
    Case("max-new-tokens-over-limit", lambda: req(max_new_tokens=DEFAULT_MAX_NEW_TOKENS_LIMIT + 1), INVALID,
         f"max_new_tokens must be <= {DEFAULT_MAX_NEW_TOKENS_LIMIT}"),
    Case("max-new-tokens-int32-max", lambda: req(max_new_tokens=2**31 - 1), INVALID, "got 2147483647"),
    # -- temperature -------------------------------------------------------------------------------
    Case("temperature-nan", lambda: req(temperature=math.nan), INVALID, "temperature must be a finite number"),
    Case("temperature-inf", lambda: req(temperature=math.inf), INVALID, "temperature must be a finite number"),
    Case("temperature-minus-inf", lambda: req(temperature=-math.inf), INVALID, "temperature must be a finite"),
    Case("temperature-negative", lambda: req(temperature=-0.5), INVALID, "temperature must be >= 0"),
    Case("temperature-minus-zero-is-greedy", lambda: req(temperature=-0.0, max_new_tokens=6), OK,
         check=is_greedy(PROMPT, 6)),
    Case("temperature-1e-300-is-greedy", lambda: req(temperature=1e-300, max_new_tokens=6, seed=3), OK,
         check=is_greedy(PROMPT, 6)),
    Case("temperature-subnormal-is-greedy", lambda: req(temperature=5e-324, max_new_tokens=6), OK,
         check=is_greedy(PROMPT, 6)),
    Case("temperature-1e308-samples", lambda: req(temperature=1e308, max_new_tokens=6, ignore_eos=True), OK,
         check=sampled(6)),
    # -- top_p / top_k --------------------------------------------------------------------------------
    Case("top-p-0", lambda: req(temperature=1.0, top_p=0.0), INVALID, "top_p must be in (0, 1], got 0.0"),
    Case("top-p-negative", lambda: req(temperature=1.0, top_p=-0.1), INVALID, "top_p must be in (0, 1]"),
    Case("top-p-over-1", lambda: req(temperature=1.0, top_p=1.5), INVALID, "top_p must be in (0, 1], got 1.5"),
    Case("top-p-nan", lambda: req(temperature=1.0, top_p=math.nan), INVALID, "top_p must be a finite number"),
    Case("top-p-inf", lambda: req(temperature=1.0, top_p=math.inf), INVALID, "top_p must be a finite number"),
    Case("top-p-1e-300-keeps-the-top-token",  # the nucleus is the top token: greedy
         lambda: req(temperature=1.0, top_p=1e-300, max_new_tokens=6, ignore_eos=True), OK,
         check=is_greedy(PROMPT, 6, ignore_eos=True)),
    Case("top-k-negative", lambda: req(temperature=1.0, top_k=-1), INVALID, "top_k must be >= 0"),
    Case("top-k-int32-min", lambda: req(temperature=1.0, top_k=-2**31), INVALID, "top_k must be >= 0"),
    Case("top-k-int32-max", lambda: req(temperature=1.0, top_k=2**31 - 1, max_new_tokens=5, ignore_eos=True), OK,
         check=sampled(5)),
    Case("top-k-1-is-greedy", lambda: req(temperature=2.0, top_k=1, max_new_tokens=6, ignore_eos=True), OK,
         check=is_greedy(PROMPT, 6, ignore_eos=True)),
    # -- seed -------------------------------------------------------------------------------------------
    Case("seed-negative", lambda: req(temperature=1.0, seed=-1, max_new_tokens=5, ignore_eos=True), OK,
         check=sampled(5)),
    Case("seed-int64-min", lambda: req(temperature=1.0, seed=-2**63, max_new_tokens=5, ignore_eos=True), OK,
         check=sampled(5)),
    Case("seed-int64-max", lambda: req(temperature=1.0, seed=2**63 - 1, max_new_tokens=5, ignore_eos=True), OK,
         check=sampled(5)),
    # -- stop strings / stop token ids ------------------------------------------------------------------
    Case("stop-longer-than-context", lambda: req(stop=["x" * (MAX_LEN + 1)]), INVALID,
         f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters"),
    Case("too-many-stops", lambda: req(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]), INVALID,
         f"at most {MAX_STOP_STRINGS} stop strings, got {MAX_STOP_STRINGS + 1}"),
    Case("empty-stop", lambda: req(stop=["ok", ""]), INVALID, "stop strings must not be empty"),
    Case("stop-without-tokenizer", lambda: req(stop=["x"]), INVALID, "stop strings need a tokenizer",
         server="notok"),
    Case("stop-token-id-negative", lambda: req(stop_token_ids=[3, -1]), INVALID,
         "stop_token_ids: token id -1 out of range [0, 512)"),
    Case("stop-token-id-equals-vocab", lambda: req(stop_token_ids=[VOCAB]), INVALID,
         "stop_token_ids: token id 512 out of range [0, 512)"),
    Case("stop-token-id-int32-max", lambda: req(stop_token_ids=[2**31 - 1]), INVALID, "token id 2147483647"),
    Case("too-many-stop-token-ids", lambda: req(stop_token_ids=[3] * (MAX_STOP_TOKEN_IDS + 1)), INVALID,
         f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids"),
    Case("5m-stop-token-ids", lambda: req(stop_token_ids=[300] * 5_000_000), INVALID, "stop_token_ids",
         timeout=10),
    # -- request id ----------------------------------------------------------------------------------------
    Case("request-id-with-space", lambda: req(request_id="has space"), INVALID, "request_id must be 1-128 printable"),
    Case("request-id-129-chars", lambda: req(request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), INVALID, "request_id"),
    Case("request-id-128-chars", lambda: req(request_id="r" * MAX_REQUEST_ID_CHARS), OK,
         check=echoes_request_id("r" * MAX_REQUEST_ID_CHARS)),
    Case("request-id-control-char", lambda: req(request_id="id\x01"), INVALID, "printable ASCII"),
    Case("request-id-newline", lambda: req(request_id="id\nx-injected: 1"), INVALID, "printable ASCII"),
    Case("request-id-unicode", lambda: req(request_id="réquest-ü"), INVALID, "printable ASCII"),
    Case("request-id-nul", lambda: req(request_id="a\x00b"), INVALID, "printable ASCII"),
    # -- size ------------------------------------------------------------------------------------------------
    Case("oversized-message", lambda: req("a" * (API_MAX_MESSAGE_BYTES + 16)), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "larger than max", timeout=30),
    # -- auth ---------------------------------------------------------------------------------------------------
    Case("auth-missing", lambda: req(), UNAUTH, "missing API token", metadata=()),
    Case("auth-wrong-token", lambda: req(), UNAUTH, "invalid API token", metadata=auth("wrong-" + TOKEN)),
    Case("auth-token-prefix", lambda: req(), UNAUTH, "invalid API token", metadata=auth(TOKEN[:-1])),
    Case("auth-wrong-key", lambda: req(), UNAUTH, "missing API token",
         metadata=(("x-api-key", f"Bearer {TOKEN}"),)),
    Case("auth-bearer-without-token", lambda: req(), UNAUTH, "malformed authorization metadata",
         metadata=(("authorization", "Bearer"),)),
    Case("auth-bearer-then-spaces", lambda: req(), UNAUTH, "malformed authorization metadata",
         metadata=(("authorization", "Bearer    "),)),
    Case("auth-no-scheme", lambda: req(), UNAUTH, "malformed authorization metadata",
         metadata=(("authorization", TOKEN),)),
    Case("auth-basic-scheme", lambda: req(), UNAUTH, "malformed authorization metadata",
         metadata=(("authorization", f"Basic {TOKEN}"),)),
    Case("auth-wrong-token-first", lambda: req(), UNAUTH, "invalid API token",
         metadata=(("authorization", "Bearer nope"), ("authorization", f"Bearer {TOKEN}"))),
    Case("auth-checked-before-parsing", lambda: b"\xff\xff\xff", UNAUTH, "missing API token", metadata=()),
    Case("auth-scheme-is-case-insensitive", lambda: req(max_new_tokens=5), OK,
         metadata=(("authorization", f"bearer {TOKEN}"),), check=is_greedy(PROMPT, 5)),
    Case("model-info-without-token", lambda: pb.ModelInfoRequest(), UNAUTH, "missing API token", metadata=(),
         method="ModelInfo"),
]


def _call(conn: Conn, case: Case):
    """Responses (a list for Generate) or the RpcError."""
    msg = case.make()
    metadata = auth() if case.metadata is None else case.metadata
    if case.method == "Generate":
        call = conn.raw["Generate"] if isinstance(msg, bytes) else conn.stub.Generate
        return list(call(msg, metadata=metadata, timeout=case.timeout))
    call = conn.raw["ModelInfo"] if isinstance(msg, bytes) else conn.stub.ModelInfo
    return call(msg, metadata=metadata, timeout=case.timeout)


def test_table_has_enough_cases():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(conns, greedy, case):
    conn = conns[case.server]
    try:
        got, code, details = _call(conn, case), OK, ""
    except grpc.RpcError as e:
        got, code, details = None, e.code(), e.details() or ""
    assert code == case.code, f"{case.id}: {code} {details!r}"
    if code == OK:
        case.check(got, greedy)
    else:
        assert details.strip() and case.needle in details, details
        assert TOKEN not in details
    assert_serves_normally(conn, greedy)


def test_after_the_table_the_server_is_healthy_and_holds_nothing(served, conns, greedy):
    for service in ("", "moeyard.v1.Inference"):
        health = health_pb2_grpc.HealthStub(conns["tok"].channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    wait_idle(served.async_engine)
    stats = served.async_engine.stats()
    assert (stats.running, stats.waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert served.engine.blocks.usage() == 0.0
    assert not served.thread.server.servicer._in_flight
    assert_serves_normally(conns["tok"], greedy)


def test_limits_were_read_from_the_model(served):
    limits = served.thread.server.servicer.limits
    assert (limits.vocab_size, limits.max_model_len) == (VOCAB, MAX_LEN)
    longest = max(map(len, served.engine.tokenizer.tok.get_vocab()))
    assert limits.max_text_chars == MAX_LEN * longest


def test_hostile_requests_do_not_fail_the_requests_batched_with_them(served, conns, greedy):
    """Sampling values the sampler cannot represent once failed the whole engine step, i.e. every
    request in flight: a long greedy stream runs while hostile requests come and go next to it."""
    conn = conns["tok"]
    long_new = 300
    expected = greedy(PROMPT, long_new)
    got: list[int] = []
    errors: list[BaseException] = []
    first = threading.Event()

    def long_stream():
        try:
            for r in conn.stub.Generate(req(PROMPT, max_new_tokens=long_new, ignore_eos=True), metadata=auth(),
                                        timeout=60):
                got.extend(r.token_ids)
                first.set()
        except BaseException as e:  # reported below
            errors.append(e)
            first.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert first.wait(30)
        hostile = [req(temperature=1e-300, max_new_tokens=8, ignore_eos=True),
                   req(temperature=1.0, top_p=1e-300, max_new_tokens=8, ignore_eos=True),
                   req(temperature=1e308, top_p=1e-300, max_new_tokens=8, ignore_eos=True),
                   req(temperature=5e-324, top_k=2**31 - 1, seed=-2**63, max_new_tokens=8, ignore_eos=True)]
        for h in hostile:
            resps = list(conn.stub.Generate(h, metadata=auth(), timeout=30))
            assert len(tokens(resps)) == 8
    finally:
        t.join(60)
    assert not errors, errors[0]
    assert got == expected


# -- property-based: any combination of field values -------------------------------------------------

def _ints(bits: int):
    lo, hi = -2**(bits - 1), 2**(bits - 1) - 1
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, -1, 0, 1]))


_ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-6, 1.0, 1e308, math.nan, -math.inf]))
_VALID_ID = st.integers(0, VOCAB - 1)
_ANY_ID = st.one_of(_VALID_ID, _ints(32))
_ASCII_ID = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=MAX_REQUEST_ID_CHARS)

# field -> (values that are valid, values that mostly are not); valid lengths stay small (an example
# should take milliseconds), so generation never runs long
FIELDS = {
    "prompt": (st.one_of(st.lists(_VALID_ID, min_size=1, max_size=24), st.text(min_size=1, max_size=60)),
               st.one_of(st.none(), st.lists(_ANY_ID, max_size=24), st.text(max_size=60),
                         st.integers(MAX_LEN - 2, MAX_LEN + 2).map(lambda n: [5] * n))),
    "max_new_tokens": (st.none() | st.integers(1, 8),
                       st.one_of(st.integers(-2**31, 0), st.integers(DEFAULT_MAX_NEW_TOKENS_LIMIT + 1, 2**31 - 1),
                                 st.sampled_from([-2**31, -1, 0, 2**31 - 1]))),
    "temperature": (st.none() | st.floats(0, 2) | st.sampled_from([1e-300, 5e-324, 1e308]), _ANY_FLOAT),
    "top_p": (st.none() | st.floats(0, 1, exclude_min=True) | st.just(1e-300), _ANY_FLOAT),
    "top_k": (st.integers(0, 2 * VOCAB) | st.just(2**31 - 1), _ints(32)),
    "seed": (st.none() | _ints(64), st.none() | _ints(64)),
    "stop": (st.lists(st.text(min_size=1, max_size=MAX_STOP_STRING_CHARS), max_size=4),
             st.lists(st.text(max_size=MAX_STOP_STRING_CHARS + 4), max_size=MAX_STOP_STRINGS + 2)),
    "stop_token_ids": (st.lists(_VALID_ID, max_size=6), st.lists(_ANY_ID, max_size=6)),
    "ignore_eos": (st.booleans(), st.booleans()),
    "request_id": (st.just("") | _ASCII_ID, st.text(max_size=MAX_REQUEST_ID_CHARS + 12)),
}
OUTCOMES: dict[str, int] = {}


@st.composite
def generate_requests(draw):
    """A GenerateRequest with up to 3 fields drawn from anything and the rest from valid values
    (so that valid, served requests are common too)."""
    wild = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3))
    v = {name: draw(FIELDS[name][name in wild]) for name in FIELDS}
    r = req(v["prompt"], max_new_tokens=v["max_new_tokens"])
    for name in ("temperature", "top_p", "seed"):
        if v[name] is not None:
            setattr(r, name, v[name])
    r.top_k, r.ignore_eos, r.request_id = v["top_k"], v["ignore_eos"], v["request_id"]
    r.stop.extend(v["stop"])
    r.stop_token_ids.extend(v["stop_token_ids"])
    return r


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=generate_requests())
def test_any_request_is_served_or_refused_by_name(conns, request):
    conn = conns["tok"]
    limit = request.max_new_tokens if request.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    try:
        resps = list(conn.stub.Generate(request, metadata=auth(), timeout=20))
    except grpc.RpcError as e:
        # never INTERNAL/UNKNOWN (a bug), UNAVAILABLE (the engine failed on it) or DEADLINE_EXCEEDED (a hang)
        assert e.code() in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED), (e.code(), e.details(), request)
        assert e.details() and e.details().strip()
        OUTCOMES[e.code().name] = OUTCOMES.get(e.code().name, 0) + 1
        return
    assert resps, request
    last = resps[-1]
    assert last.finish_reason in ("stop", "length"), request
    assert all(not r.finish_reason for r in resps[:-1])
    ids = tokens(resps)
    assert 1 <= len(ids) <= limit and all(0 <= t < VOCAB for t in ids), (ids, request)
    assert last.usage.completion_tokens == len(ids)
    if request.request_id:
        assert {r.request_id for r in resps} == {request.request_id}
    OUTCOMES["OK"] = OUTCOMES.get("OK", 0) + 1


def test_after_the_properties_the_server_serves_normally(served, conns, greedy):
    if OUTCOMES:  # the property test ran: it saw both served and refused requests
        assert OUTCOMES.get("OK", 0) >= 20 and OUTCOMES.get("INVALID_ARGUMENT", 0) >= 20, OUTCOMES
    wait_idle(served.async_engine)
    assert served.async_engine.stats().kv_cache_usage == 0.0
    assert_serves_normally(conns["tok"], greedy)
