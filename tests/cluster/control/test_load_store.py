"""Windowed load counters in a real Redis: layout, idempotent rewrites, outages, buffer bound, reader."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest
import redis
import torch

from moeyard.cluster.control.load_store import (
    LoadFlusher,
    dropped_key,
    index_key,
    read_load,
    smooth,
    window_key,
    window_start_ms,
)
from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.infra.redis_server import LocalRedis
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.router_service.load_recorder import LoadRecorder

pytestmark = pytest.mark.timeout(60)
LOGGER = "moeyard.cluster.control.load_store"


@pytest.fixture
def prefix(request):
    """A key prefix of its own per test (they share one server)."""
    return "t" + str(abs(hash(request.node.name)) % 10**8)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def returns_within(fn, timeout_s: float = 60.0):
    """``fn()``'s result, failing if it has not returned within a generous ``timeout_s`` (it hangs)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"still running after {timeout_s}s"
    assert out, "raised (see the thread's traceback above)"
    return out[0]



def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_password(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feed(rec: LoadRecorder, layer: int, ids: list[list[int]], slots: list[list[int]] | None = None) -> int:
    t = torch.tensor(ids)
    rec.record(layer, t, torch.tensor(slots) if slots is not None else t)
    return len(ids)


def settings(info, prefix, **kw) -> RedisSettings:
    base = dict(key_prefix=prefix, window_s=1.0, flush_interval_s=0.05, socket_timeout_s=0.2)
    base.update(kw)
    return info.settings(**base)


# -- writing and reading ----------------------------------------------------------------------------


def test_flush_writes_windows_and_read_load_sums_reporters(local_redis, prefix):
    s = settings(local_redis, prefix)
    clock = Clock(1000.25)
    L, E, P = 2, 4, 6
    recs = {r: LoadRecorder(L, E, P) for r in ("rep-a", "rep-b")}
    fls = {r: LoadFlusher(recs[r], None, s, r, clock=clock) for r in recs}
    g = torch.Generator().manual_seed(0)
    expect_e = torch.zeros(3, L, E, dtype=torch.int64)
    expect_s = torch.zeros(3, L, P, dtype=torch.int64)
    expect_t = torch.zeros(3, dtype=torch.int64)
    for w, t0 in enumerate((1000.25, 1001.5, 1003.0)):  # windows 1000, 1001, 1003 (1002 has no traffic)
        for step in range(3):
            clock.t = t0 + 0.2 * step
            for r, rec in recs.items():
                layer = int(torch.randint(0, L, (1,), generator=g))
                ids = torch.randint(0, E, (5, 2), generator=g)
                slots = torch.randint(0, P, (5, 2), generator=g)
                rec.record(layer, ids, slots)
                expect_e[w, layer] += torch.bincount(ids.reshape(-1), minlength=E)
                expect_s[w, layer] += torch.bincount(slots.reshape(-1), minlength=P)
                expect_t[w] += 5
                assert fls[r].flush_now()
    client = connect(s)
    got = read_load(client, prefix, since_s=60, now=clock.t)
    assert got.starts.tolist() == [1000.0, 1001.0, 1003.0]
    assert got.expert_counts.dtype == torch.int64 and got.expert_counts.shape == (3, L, E)
    assert torch.equal(got.expert_counts, expect_e)
    assert torch.equal(got.slot_counts, expect_s)
    assert torch.equal(got.tokens, expect_t)
    assert got.reporters.tolist() == [2, 2, 2]
    assert bool(got.slot_complete.all()) and got.num_slots == P and got.epoch == 0
    assert got.tokens_dropped == 0 and got.entries_missing == 0 and got.window_s == 1.0
    # since_s selects by window start
    recent = read_load(client, prefix, since_s=3.0, now=clock.t + 0.1)  # from 1000.5 on
    assert recent.starts.tolist() == [1001.0, 1003.0]
    for f in fls.values():
        st = f.stop(flush=False)
        assert st.flushes_failed == 0 and st.windows_buffered == 0
    client.close()


def test_key_layout(local_redis, prefix):
    s = settings(local_redis, prefix, window_s=5.0, window_ttl_s=600)
    clock = Clock(2000.0 + 7.5)
    rec = LoadRecorder(2, 3, 4)
    fl = LoadFlusher(rec, None, s, "replica-7", epoch_fn=lambda: (42, 4), clock=clock)
    feed(rec, 1, [[0, 2], [2, 2]], [[0, 3], [3, 3]])
    assert fl.flush_now()
    c = connect(s)
    members = c.zrange(index_key(prefix), 0, -1, withscores=True)
    assert len(members) == 1
    member, score = members[0][0].decode(), members[0][1]
    assert score == 2005000 == window_start_ms(clock.t, 5.0)
    start, reporter, part = member.split(":")
    assert (start, reporter) == ("2005000", "replica-7") and "." in part
    key = window_key(prefix, member)
    assert key == f"{prefix}:load:{member}"
    h = c.hgetall(key)
    assert h[b"shape"] == b"2,3,4" and h[b"epoch"] == b"42" and h[b"tokens"] == b"2"
    assert h[b"reporter"] == b"replica-7" and float(h[b"window_s"]) == 5.0
    expert = np.frombuffer(h[b"expert"], dtype="<i8").reshape(2, 3)
    slot = np.frombuffer(h[b"slot"], dtype="<i8").reshape(2, 4)
    assert expert.tolist() == [[0, 0, 0], [1, 0, 3]]
    assert slot.tolist() == [[0, 0, 0, 0], [1, 0, 0, 3]]
    assert 0 < c.ttl(key) <= 600
    assert 0 < c.ttl(index_key(prefix)) <= 600
    assert c.get(dropped_key(prefix)) is None
    c.close()


class LossyClient:
    """Executes a pipeline but reports it as failed once (a reply lost on the way back)."""

    def __init__(self, real: redis.Redis):
        self.real = real
        self.lose_next = True

    def pipeline(self, transaction: bool = False):
        pipe = self.real.pipeline(transaction=transaction)
        run = pipe.execute

        def execute(*a, **kw):
            out = run(*a, **kw)
            if self.lose_next:
                self.lose_next = False
                raise redis.ConnectionError("reply lost")
            return out

        pipe.execute = execute
        return pipe

    def close(self):
        self.real.close()


def test_rewrites_are_idempotent(local_redis, prefix):
    s = settings(local_redis, prefix)
    clock = Clock(3000.1)
    rec = LoadRecorder(1, 4, 4)
    lossy = LossyClient(connect(s))
    fl = LoadFlusher(rec, lambda: lossy, s, "rep-0", clock=clock)
    n = feed(rec, 0, [[0, 1], [1, 2], [3, 3]])
    assert not fl.flush_now()  # written, but the flusher could not know
    assert fl.stats().windows_buffered == 1
    assert fl.flush_now()  # the same totals again
    for _ in range(3):
        clock.t += 0.1
        assert fl.flush_now()  # nothing new: nothing added
    n += feed(rec, 0, [[2, 2]])
    clock.t += 0.1
    assert fl.flush_now()
    got = read_load(lossy.real, prefix, 60, now=clock.t)
    assert got.tokens.tolist() == [n]
    assert got.expert_counts[0, 0].tolist() == [1, 2, 3, 2]
    st = fl.stats()
    assert st.flushes_failed == 1 and st.flushes_ok >= 2 and not st.failing and st.windows_buffered == 0
    lossy.close()


def test_placement_change_starts_a_new_entry(local_redis, prefix):
    s = settings(local_redis, prefix)
    clock = Clock(4000.1)
    rec = LoadRecorder(1, 4, 4)
    placement = {"now": (0, 4)}
    fl = LoadFlusher(rec, None, s, "rep-0", epoch_fn=lambda: placement["now"], clock=clock)
    feed(rec, 0, [[0, 1]], [[0, 1]])
    assert fl.flush_now()
    placement["now"] = (1, 6)  # a placement with 6 slots, same window
    rec.resize_slots(6)
    feed(rec, 0, [[0, 2]], [[4, 5]])
    clock.t += 0.2
    assert fl.flush_now()
    placement["now"] = (2, 8)  # recorder not resized yet: its slot counts cannot be placed
    feed(rec, 0, [[3, 3]], [[1, 2]])
    clock.t += 0.2
    assert fl.flush_now()
    st = fl.stats()
    assert st.slot_snapshots_discarded == 1
    c = connect(s)
    shapes = sorted(c.hget(window_key(prefix, m.decode()), "shape") for m in c.zrange(index_key(prefix), 0, -1))
    assert shapes == [b"1,4,4", b"1,4,6", b"1,4,8"]
    got = read_load(c, prefix, 60, now=clock.t)
    assert got.starts.tolist() == [4000.0]
    assert got.expert_counts[0, 0].tolist() == [2, 1, 1, 2]  # all three entries
    assert got.tokens.tolist() == [3] and got.reporters.tolist() == [3]
    assert got.num_slots == 8 and got.epoch == 2
    assert got.slot_counts.shape == (1, 1, 8) and int(got.slot_counts.sum()) == 0
    assert got.slot_complete.tolist() == [False]
    c.close()


def test_read_load_skips_expired_entries_and_trims_the_index(local_redis, prefix):
    s = settings(local_redis, prefix, window_ttl_s=5)
    clock = Clock(5000.5)
    rec = LoadRecorder(1, 2, 2)
    fl = LoadFlusher(rec, None, s, "rep-0", clock=clock)
    for t in (5000.5, 5001.5, 5002.5):
        clock.t = t
        feed(rec, 0, [[0, 1]])
        assert fl.flush_now()
    c = connect(s)
    members = [m.decode() for m in c.zrange(index_key(prefix), 0, -1)]
    c.delete(window_key(prefix, members[1]))  # as if it had expired
    got = read_load(c, prefix, 60, now=clock.t)
    assert got.starts.tolist() == [5000.0, 5002.0] and got.entries_missing == 1
    empty = read_load(c, "nothing-here", 60, now=clock.t)
    assert empty.num_windows == 0 and empty.expert_counts.shape == (0, 0, 0) and empty.tokens_dropped == 0
    # much later: members older than the TTL leave the index
    clock.t = 5100.2
    feed(rec, 0, [[1, 1]])
    assert fl.flush_now()
    left = [m.decode() for m in c.zrange(index_key(prefix), 0, -1)]
    assert len(left) == 1 and left[0].startswith("5100000:")
    with pytest.raises(ValueError, match="decode_responses"):
        read_load(redis.Redis(port=local_redis.port, password=read_password(local_redis.password_file),
                              decode_responses=True), prefix, 600, now=clock.t)
    c.close()


# -- Redis down --------------------------------------------------------------------------------------


def test_buffer_bound_counts_lost_windows_and_reports_them(tmp_path, prefix, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    password = "pw-" + "z" * 30
    pw_file = tmp_path / "pw"
    pw_file.write_text(password + "\n")
    port = free_port()  # nothing listens yet
    s = RedisSettings(url=f"redis://:{password}@127.0.0.1:{port}/0", key_prefix=prefix, window_s=1.0,
                      max_buffered_windows=2, socket_timeout_s=0.2)
    clock = Clock(6000.5)
    rec = LoadRecorder(1, 4, 4)
    fl = LoadFlusher(rec, None, s, "rep-0", clock=clock)
    for i, t in enumerate((6000.5, 6001.5, 6002.5, 6003.5)):
        clock.t = t
        for _ in range(i + 1):
            feed(rec, 0, [[i, i]])
        assert returns_within(fl.flush_now) is False  # bounded by socket timeouts: no hang
    st = fl.stats()
    assert st.failing and st.flushes_failed == 4 and st.flushes_ok == 0
    assert st.windows_dropped == 2 and st.tokens_dropped == 1 + 2 and st.windows_buffered == 2
    assert f"127.0.0.1:{port}" in st.last_error and password not in st.last_error
    info = LocalRedis.start(tmp_path / "r", port=port, password_file=pw_file)
    try:
        clock.t = 6003.6
        assert fl.flush_now()
        st = fl.stats()
        assert not st.failing and st.flushes_ok == 1 and st.windows_buffered == 0
        c = info.client()
        got = read_load(c, prefix, 60, now=clock.t)
        assert got.starts.tolist() == [6002.0, 6003.0] and got.tokens.tolist() == [3, 4]
        assert got.expert_counts[:, 0].tolist() == [[0, 0, 6, 0], [0, 0, 0, 8]]
        assert got.tokens_dropped == 3
        # reported once only
        clock.t = 6004.5
        feed(rec, 0, [[1, 1]])
        assert fl.flush_now()
        assert read_load(c, prefix, 60, now=clock.t).tokens_dropped == 3
        c.close()
        fl.stop()
    finally:
        LocalRedis.stop(info)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert len(warnings) == 1 and len(infos) == 1
    assert "redis://:***@" in warnings[0].getMessage()
    assert password not in caplog.text


def test_redis_killed_mid_run_then_back_on_the_same_port(tmp_path, prefix, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    info = LocalRedis.start(tmp_path / "r")
    password = read_password(info.password_file)
    s = settings(info, prefix, window_s=0.2, flush_interval_s=0.05, socket_timeout_s=0.2)
    rec = LoadRecorder(2, 4, 4)
    fl = LoadFlusher(rec, None, s, "rep-0").start()
    errors: list[BaseException] = []
    counted = {"all": 0, "since_kill": 0}
    killed = threading.Event()
    stop = threading.Event()

    def serve():  # the engine: records every layer, must never see an exception
        g = torch.Generator().manual_seed(1)
        try:
            while not stop.is_set():
                ids = torch.randint(0, 4, (3, 2), generator=g)
                rec.record(int(torch.randint(0, 2, (1,), generator=g)), ids, ids)
                counted["all"] += 3
                if killed.is_set():
                    counted["since_kill"] += 3
                time.sleep(0.005)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    engine = threading.Thread(target=serve)
    engine.start()
    info2 = None
    try:
        wait_for(lambda: fl.stats().flushes_ok >= 3, what="first flushes")
        LocalRedis.stop(info)
        killed.set()
        wait_for(lambda: fl.stats().flushes_failed >= 5, what="failed flushes")
        st = fl.stats()
        assert st.failing and st.windows_buffered >= 1 and st.last_error
        assert password not in st.last_error
        assert fl._thread is not None and fl._thread.is_alive()
        info2 = LocalRedis.start(tmp_path / "r", port=info.port, password_file=info.password_file)
        wait_for(lambda: fl.stats().flushes_ok > st.flushes_ok and not fl.stats().failing, what="recovery")
        stop.set()
        engine.join(10)
        final = fl.stop(flush=True)
        assert fl.stats().windows_buffered == 0 and final.windows_dropped == 0 and final.tokens_dropped == 0
        c = connect(s)
        got = read_load(c, prefix, 600)
        c.close()
        # Redis came back empty (no persistence): what arrived is every window since the kill
        assert int(got.tokens.sum()) >= counted["since_kill"] > 0
        assert int(got.tokens.sum()) <= counted["all"]
        assert int(got.expert_counts.sum()) == 2 * int(got.tokens.sum())
    finally:
        stop.set()
        engine.join(10)
        fl.stop(flush=False, timeout=5)
        if info2 is not None:
            LocalRedis.stop(info2)
    assert not errors
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert len(infos) == 1 and "answers again" in infos[0].getMessage()
    assert password not in caplog.text


def test_flusher_without_redis_never_raises(prefix, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    s = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=prefix, flush_interval_s=0.02,
                      socket_timeout_s=0.1)
    rec = LoadRecorder(1, 2, 2)
    with LoadFlusher(rec, None, s, "rep-0") as fl:
        for _ in range(20):
            feed(rec, 0, [[0, 1]])
            time.sleep(0.005)
        wait_for(lambda: fl.stats().flushes_failed >= 2, what="failures")
    assert fl.stats().windows_buffered >= 1
    assert any("stops with" in r.getMessage() and "not written" in r.getMessage() for r in caplog.records)

    def broken():
        raise RuntimeError("factory broke")

    fl2 = LoadFlusher(rec, broken, s, "rep-1")
    feed(rec, 0, [[0, 1]])
    assert fl2.flush_now() is False and "factory broke" in fl2.stats().last_error


def test_a_redis_that_never_answers_costs_a_bounded_flush(prefix):
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        s = RedisSettings(url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0", key_prefix=prefix,
                          socket_timeout_s=0.1)
        rec = LoadRecorder(1, 2, 2)
        fl = LoadFlusher(rec, None, s, "rep-0")
        feed(rec, 0, [[0, 1]])
        assert returns_within(fl.flush_now) is False
        assert "Timeout" in fl.stats().last_error
        fl.stop(flush=False)


def test_stop_flushes_what_is_left(local_redis, prefix):
    s = settings(local_redis, prefix, flush_interval_s=30.0)  # the thread would not flush in time
    rec = LoadRecorder(1, 2, 2)
    fl = LoadFlusher(rec, None, s, "rep-0").start()
    feed(rec, 0, [[0, 1], [1, 1]])
    st = returns_within(lambda: fl.stop(flush=True))
    assert st.flushes_ok == 1 and st.windows_buffered == 0
    c = connect(s)
    assert read_load(c, prefix, 60).tokens.tolist() == [2]
    c.close()


def test_reporter_id_must_fit_a_key():
    s = RedisSettings(url="redis://127.0.0.1:1/0")
    for bad in ("a:b", "a b", ""):
        with pytest.raises(ValueError):
            LoadFlusher(LoadRecorder(1, 2, 2), None, s, bad)


# -- smooth ------------------------------------------------------------------------------------------


def test_smooth_weights_newest_most():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    w = torch.stack([a, b])  # [W=2, L=1, E=2]
    out = smooth(w, half_life_windows=1.0)
    assert out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor([[0.5 / 1.5, 1.0 / 1.5]], dtype=torch.float64))
    # naive formula on random data
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (7, 3, 5), generator=g)
    h = 2.5
    num = sum(0.5 ** ((6 - i) / h) * x[i].double() for i in range(7))
    den = sum(0.5 ** ((6 - i) / h) for i in range(7))
    assert torch.allclose(smooth(x, h), num / den)


def test_smooth_edge_cases():
    const = torch.full((4, 2, 3), 7, dtype=torch.int64)
    assert torch.allclose(smooth(const, 0.5), torch.full((2, 3), 7.0, dtype=torch.float64))
    one = torch.arange(6).reshape(1, 2, 3)
    assert torch.equal(smooth(one, 3.0), one.double()[0])
    assert torch.equal(smooth(torch.zeros(0, 2, 3), 1.0), torch.zeros(2, 3, dtype=torch.float64))
    # a long half-life tends to the plain mean, a short one to the newest window
    x = torch.tensor([[[0.0]], [[10.0]]])
    assert abs(float(smooth(x, 1e6)) - 5.0) < 1e-3
    assert abs(float(smooth(x, 1e-3)) - 10.0) < 1e-3
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            smooth(x, bad)
