"""Windowed expert load counters in Redis: written by every attention replica, read by the planner.

Key layout (``{prefix}`` = ``RedisSettings.key_prefix``, one per cluster)::

    {prefix}:load:{window_start_ms}:{reporter}:{part}
        hash, one per window, reporter and part; EXPIRE window_ttl_s (refreshed at each write)
          expert    raw little-endian int64 bytes of expert_counts [L, E]
          slot      raw little-endian int64 bytes of slot_counts   [L, P]
          shape     "L,E,P"
          epoch     placement epoch the slot counts belong to
          tokens    token rows counted (summed over MoE layers, as LoadSnapshot.tokens)
          window_s  window length in seconds
          reporter  the reporter id again
    {prefix}:load:index
        sorted set; member "{window_start_ms}:{reporter}:{part}" (the hash key less
        "{prefix}:load:"), score window_start_ms; members older than window_ttl_s are
        trimmed with ZREMRANGEBYSCORE at every flush; EXPIRE window_ttl_s
    {prefix}:load:tokens_dropped
        integer (INCRBY): tokens reporters dropped because Redis was down longer than
        their buffer lasted; added once Redis answers again; no TTL

``window_start_ms = floor(now / window_s) * window_s`` in integer milliseconds.
``reporter`` is the attention replica id; ``part`` is ``{run}.{generation}``:
``run`` is random per :class:`LoadFlusher` (a restarted replica never
overwrites the windows of its predecessor) and ``generation`` grows whenever
the placement (epoch or slot count) changes, so that one hash holds one
placement and one slot shape. Readers sum all hashes of a window.

Writes are idempotent: the reporter keeps each window's running totals in
memory and rewrites the whole hash (HSET) until the window has ended and its
last write is confirmed; a retried flush never double counts. All commands of
a flush go in one pipeline (``transaction=False``). When Redis is down the
windows stay buffered (at most ``max_buffered_windows``, then the oldest are
dropped and their tokens counted); serving never sees an exception, and a
flush to a Redis that hangs costs the flusher thread a few socket timeouts
(connect and command, each retried twice: about ``9 * socket_timeout_s`` at worst).

Counts are attributed to the window in which the flusher takes them from the
recorder, so a window boundary is accurate to one ``flush_interval_s``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import redis
import torch

from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.settings.redis import KEY_PART_PATTERN, RedisSettings, redact_text
from moeyard.router_service.load_recorder import LoadRecorder, LoadSnapshot

log = logging.getLogger(__name__)


def index_key(prefix: str) -> str:
    return f"{prefix}:load:index"


def dropped_key(prefix: str) -> str:
    return f"{prefix}:load:tokens_dropped"


def window_key(prefix: str, member: str) -> str:
    """Hash key of an index ``member`` (``"{window_start_ms}:{reporter}:{part}"``)."""
    return f"{prefix}:load:{member}"


def window_start_ms(now: float, window_s: float) -> int:
    """Start of the window holding ``now`` (seconds) in integer milliseconds."""
    return int(round(math.floor(now / window_s) * window_s * 1000))


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes()


def _from_bytes(b: bytes, rows: int, cols: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(b, dtype="<i8").astype(np.int64).reshape(rows, cols))


# ----------------------------------------------------------------------------------------------------
# writer


@dataclass
class FlusherStats:
    """What the flusher did; loss is counted here (and in Redis once it answers again)."""

    flushes_ok: int = 0
    flushes_failed: int = 0
    windows_buffered: int = 0
    """Window entries not yet confirmed written."""
    windows_dropped: int = 0
    tokens_dropped: int = 0
    slot_snapshots_discarded: int = 0
    """Snapshots whose slot counts did not match the placement's slot count (a placement switch)."""
    last_error: str | None = None
    """Redacted: never holds a password."""
    last_ok_time: float | None = None
    failing: bool = False


@dataclass
class _Entry:
    window_ms: int
    gen: int
    epoch: int
    expert: torch.Tensor
    slot: torch.Tensor
    tokens: int = 0
    confirmed_tokens: int = 0
    """Tokens of the last write Redis confirmed (loss on a drop is ``tokens - confirmed_tokens``)."""
    dirty: bool = True
    member: str = ""


class LoadFlusher:
    """A daemon thread that moves a :class:`LoadRecorder`'s counts into Redis windows.

    Args:
        recorder: the replica's recorder.
        client_factory: returns a ``redis.Redis`` (``decode_responses=False``);
            None = ``connect(settings)``. Called lazily, once; the pool reconnects.
        settings: intervals, window length, TTL, buffer bound, key prefix.
        reporter_id: this replica's id (letters, digits, ``_.-``; no ``:``).
        epoch_fn: returns the placement in force as ``(epoch, num_slots)``;
            None = ``(0, recorder.num_slots)``. Whoever switches placements calls
            ``recorder.resize_slots`` when the slot count changes.
        clock: wall clock in seconds (tests).
        on_snapshot: called with every snapshot taken from the recorder, before it is
            windowed (the replica's cumulative Prometheus counters); must not raise.

    :meth:`start` starts the thread, :meth:`stop` ends it; :meth:`flush_now`
    runs one flush on the caller's thread. Nothing here raises into serving.
    """

    def __init__(self, recorder: LoadRecorder, client_factory: Callable[[], redis.Redis] | None,
                 settings: RedisSettings, reporter_id: str,
                 epoch_fn: Callable[[], tuple[int, int]] | None = None,
                 clock: Callable[[], float] = time.time,
                 on_snapshot: Callable[[LoadSnapshot], None] | None = None):
        if not re.match(KEY_PART_PATTERN, reporter_id):
            raise ValueError(f"reporter id {reporter_id!r} must match {KEY_PART_PATTERN} (no ':' or spaces)")
        self.recorder = recorder
        self.settings = settings
        self.reporter_id = reporter_id
        self._client_factory = client_factory or (lambda: connect(settings))
        self._epoch_fn = epoch_fn or (lambda: (0, recorder.num_slots))
        self._clock = clock
        self._on_snapshot = on_snapshot
        self._run_id = secrets.token_hex(4)
        self._client: redis.Redis | None = None
        self._entries: dict[tuple[int, int], _Entry] = {}  # (window_ms, gen) -> entry, oldest first
        self._placement: tuple[int, int] | None = None
        self._gen = 0
        self._current: tuple[int, int] | None = None
        self._unreported_dropped = 0
        self._stats = FlusherStats()
        self._flush_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "LoadFlusher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"load-flusher-{self.reporter_id}",
                                            daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop_event.wait(self.settings.flush_interval_s):
            self.flush_now()

    def stop(self, flush: bool = True, timeout: float | None = None) -> FlusherStats:
        """End the thread (waiting at most ``timeout``), flush once more if ``flush``; idempotent."""
        self._stop_event.set()
        if self._thread is not None:
            limit = timeout if timeout is not None else self.settings.flush_interval_s + \
                10 * self.settings.socket_timeout_s + 1.0  # a flush to a hung Redis: <= ~9 socket timeouts
            self._thread.join(limit)
            if self._thread.is_alive():
                log.warning("load flusher %s did not stop within %.1f s", self.reporter_id, limit)
            self._thread = None
        if flush:
            self.flush_now()
        with self._flush_lock:
            left = [e for e in self._entries.values() if e.dirty]
        if left:
            log.warning("load flusher %s stops with %d windows (%d tokens) not written to Redis at %s",
                        self.reporter_id, len(left), sum(e.tokens - e.confirmed_tokens for e in left),
                        self.settings.redacted_url())
        if self._client is not None:
            with contextlib.suppress(Exception):  # closing is best effort
                self._client.close()
            self._client = None
        return self.stats()

    def __enter__(self) -> "LoadFlusher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> FlusherStats:
        with self._stats_lock:
            return replace(self._stats)

    # -- one flush ---------------------------------------------------------------------------------

    def flush_now(self) -> bool:
        """Take the recorder's counts, add them to the current window and write every window not yet
        confirmed. Returns whether Redis confirmed the write (True when there was nothing to write)."""
        with self._flush_lock:
            try:
                snap = self.recorder.take()
                if self._on_snapshot is not None:
                    try:
                        self._on_snapshot(snap)
                    except Exception:  # noqa: BLE001 - metrics never cost the load windows
                        log.exception("load snapshot hook failed")
                self._collect(snap, self._clock())
                return self._write()
            except Exception as e:  # noqa: BLE001 - never into serving
                self._failed(e)
                return False

    def _read_placement(self) -> tuple[int, int]:
        try:
            epoch, num_slots = self._epoch_fn()
            return int(epoch), int(num_slots)
        except Exception as e:  # noqa: BLE001
            log.debug("epoch_fn failed (%s); keeping the last placement", e)
            return self._placement if self._placement is not None else (0, self.recorder.num_slots)

    def _collect(self, snap: LoadSnapshot, now: float) -> None:
        placement = self._read_placement()
        if placement != self._placement:
            if self._placement is not None:
                self._gen += 1  # the current window's entry is closed: one hash, one placement
            self._placement = placement
        epoch, num_slots = placement
        key = (window_start_ms(now, self.settings.window_s), self._gen)
        self._current = key
        if snap.tokens == 0:
            return
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(key[0], key[1], epoch, torch.zeros_like(snap.expert_counts),
                           torch.zeros(snap.expert_counts.shape[0], num_slots, dtype=torch.int64),
                           member=f"{key[0]}:{self.reporter_id}:{self._run_id}.{key[1]}")
            self._entries[key] = entry
        entry.expert += snap.expert_counts
        if snap.slot_counts.shape == entry.slot.shape:
            entry.slot += snap.slot_counts
        elif bool(snap.slot_counts.any()):
            with self._stats_lock:
                self._stats.slot_snapshots_discarded += 1
        entry.tokens += snap.tokens
        entry.dirty = True
        self._bound_buffer()

    def _bound_buffer(self) -> None:
        dirty = [k for k, e in self._entries.items() if e.dirty]
        excess = len(dirty) - self.settings.max_buffered_windows
        for k in dirty:
            if excess <= 0:
                break
            if k == self._current:
                continue
            e = self._entries.pop(k)
            lost = e.tokens - e.confirmed_tokens
            self._unreported_dropped += lost
            with self._stats_lock:
                self._stats.windows_dropped += 1
                self._stats.tokens_dropped += lost
            excess -= 1
        self._update_buffered()

    def _update_buffered(self) -> None:
        n = sum(e.dirty for e in self._entries.values())
        with self._stats_lock:
            self._stats.windows_buffered = n

    def _write(self) -> bool:
        pending = [e for e in self._entries.values() if e.dirty]
        unreported = self._unreported_dropped
        if not pending and not unreported:
            return True
        if self._client is None:
            self._client = self._client_factory()
        s = self.settings
        prefix = s.key_prefix
        now = self._clock()
        pipe = self._client.pipeline(transaction=False)
        for e in pending:
            key = window_key(prefix, e.member)
            num_layers, num_experts = e.expert.shape
            pipe.hset(key, mapping={
                "expert": _to_bytes(e.expert), "slot": _to_bytes(e.slot),
                "shape": f"{num_layers},{num_experts},{e.slot.shape[1]}", "epoch": e.epoch,
                "tokens": e.tokens, "window_s": repr(s.window_s), "reporter": self.reporter_id,
            })
            pipe.expire(key, s.window_ttl_s)
            pipe.zadd(index_key(prefix), {e.member: e.window_ms})
        pipe.zremrangebyscore(index_key(prefix), "-inf", f"({int((now - s.window_ttl_s) * 1000)}")
        pipe.expire(index_key(prefix), s.window_ttl_s)
        if unreported:
            pipe.incrby(dropped_key(prefix), unreported)
        pipe.execute()
        # confirmed: the written totals are in Redis
        for e in pending:
            e.dirty = False
            e.confirmed_tokens = e.tokens
        self._unreported_dropped -= unreported
        for k in [k for k, e in self._entries.items() if not e.dirty and k != self._current]:
            del self._entries[k]  # ended windows whose last totals are written
        self._ok()
        return True

    def _ok(self) -> None:
        with self._stats_lock:
            st = self._stats
            was_failing = st.failing
            st.flushes_ok += 1
            st.failing = False
            st.last_ok_time = self._clock()
            st.windows_buffered = sum(e.dirty for e in self._entries.values())
            failed, wd, td = st.flushes_failed, st.windows_dropped, st.tokens_dropped
        if was_failing:
            log.info("load statistics: Redis at %s answers again (%d failed flushes so far; "
                     "%d windows / %d tokens dropped in all)", self.settings.redacted_url(), failed, wd, td)

    def _failed(self, e: BaseException) -> None:
        msg = redact_text(f"{type(e).__name__}: {e}", self.settings)
        with self._stats_lock:
            st = self._stats
            first = not st.failing
            st.flushes_failed += 1
            st.failing = True
            st.last_error = msg
            st.windows_buffered = sum(x.dirty for x in self._entries.values())
        if first:
            log.warning("load statistics: writing to Redis at %s failed (%s); buffering up to %d windows, "
                        "serving goes on", self.settings.redacted_url(), msg, self.settings.max_buffered_windows)


# ----------------------------------------------------------------------------------------------------
# reader


@dataclass
class LoadWindows:
    """Load per window, summed over reporters, oldest window first."""

    starts: torch.Tensor
    """``[W]`` float64 window starts (seconds)."""
    expert_counts: torch.Tensor
    """``[W, L, E]`` int64 (``[0, 0, 0]`` when no window was found)."""
    tokens: torch.Tensor
    """``[W]`` int64 token rows (summed over MoE layers)."""
    reporters: torch.Tensor
    """``[W]`` int64 number of hashes (reporter parts) summed into each window."""
    slot_counts: torch.Tensor
    """``[W, L, P]`` int64 for ``P = num_slots`` (the newest entry's); hashes of another
    slot count add nothing here."""
    slot_complete: torch.Tensor
    """``[W]`` bool: every hash of the window had ``P`` slots (its slot counts are whole)."""
    num_slots: int
    epoch: int | None
    """Placement epoch of the newest entry."""
    tokens_dropped: int
    """``P:load:tokens_dropped``: tokens reporters lost while Redis was down (all time)."""
    entries_missing: int = 0
    """Index members whose hash had expired, was malformed or had another ``[L, E]``."""
    window_s: float | None = None

    @property
    def num_windows(self) -> int:
        return self.starts.shape[0]


def _field(h: dict, name: str) -> bytes | None:
    v = h.get(name.encode())
    if v is None and name in h:
        raise ValueError("read_load needs a client with decode_responses=False (raw bytes)")
    return v


def read_load(client: redis.Redis, prefix: str, since_s: float, now: float | None = None) -> LoadWindows:
    """Windows that started within the last ``since_s`` seconds, summed over reporters.

    Expired or malformed hashes are skipped (counted in ``entries_missing``);
    hashes whose ``[L, E]`` differs from the newest one's are skipped too.
    """
    now = time.time() if now is None else now
    lo = math.floor((now - since_s) * 1000)
    members = client.zrangebyscore(index_key(prefix), lo, "+inf")
    pipe = client.pipeline(transaction=False)
    for m in members:
        pipe.hgetall(window_key(prefix, m.decode() if isinstance(m, bytes) else m))
    pipe.get(dropped_key(prefix))
    *hashes, dropped = pipe.execute()
    parsed: list[tuple[int, int, int, int, int, int, torch.Tensor, bytes]] = []
    missing = 0
    window_s = None
    for m, h in zip(members, hashes, strict=True):
        if not h:
            missing += 1
            continue
        try:
            shape = _field(h, "shape")
            num_layers, num_experts, num_slots = (int(x) for x in shape.decode().split(","))
            expert = _from_bytes(_field(h, "expert"), num_layers, num_experts)
            slot_raw = _field(h, "slot") or b""
            if len(slot_raw) != num_layers * num_slots * 8:
                raise ValueError("slot bytes do not match the shape")
            start = int((m.decode() if isinstance(m, bytes) else m).split(":", 1)[0])
            epoch = int(_field(h, "epoch") or b"0")
            tokens = int(_field(h, "tokens") or b"0")
            ws = _field(h, "window_s")
            window_s = float(ws) if ws else window_s
        except (AttributeError, TypeError, ValueError) as e:
            if "decode_responses" in str(e):
                raise
            missing += 1
            continue
        parsed.append((start, num_layers, num_experts, num_slots, epoch, tokens, expert, slot_raw))
    tokens_dropped = int(dropped) if dropped else 0
    if not parsed:
        z = torch.zeros(0, dtype=torch.int64)
        return LoadWindows(torch.zeros(0, dtype=torch.float64), torch.zeros(0, 0, 0, dtype=torch.int64), z, z,
                           torch.zeros(0, 0, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool), 0, None,
                           tokens_dropped, missing, window_s)
    # the reference shape: the newest window's entry of the highest placement epoch
    _, ref_l, ref_e, ref_p, ref_epoch, *_ = max(parsed, key=lambda r: (r[0], r[4]))
    starts = sorted({r[0] for r in parsed})
    pos = {s: i for i, s in enumerate(starts)}
    w = len(starts)
    expert_counts = torch.zeros(w, ref_l, ref_e, dtype=torch.int64)
    slot_counts = torch.zeros(w, ref_l, ref_p, dtype=torch.int64)
    tokens_t = torch.zeros(w, dtype=torch.int64)
    reporters = torch.zeros(w, dtype=torch.int64)
    complete = torch.ones(w, dtype=torch.bool)
    for start, nl, ne, np_, _epoch, tokens, expert, slot_raw in parsed:
        i = pos[start]
        if (nl, ne) != (ref_l, ref_e):
            missing += 1
            complete[i] = False
            continue
        expert_counts[i] += expert
        tokens_t[i] += tokens
        reporters[i] += 1
        if np_ == ref_p:
            slot_counts[i] += _from_bytes(slot_raw, nl, np_)
        else:
            complete[i] = False
    return LoadWindows(torch.tensor(starts, dtype=torch.float64) / 1000, expert_counts, tokens_t, reporters,
                       slot_counts, complete, ref_p, ref_epoch, tokens_dropped, missing, window_s)


def smooth(windows: torch.Tensor, half_life_windows: float) -> torch.Tensor:
    """Exponentially weighted mean over windows, newest weighted most.

    ``windows [W, L, E]`` (oldest first) -> ``[L, E]`` float64: window ``i``
    has weight ``0.5 ** ((W - 1 - i) / half_life_windows)``, normalised to sum
    to 1. ``W == 0`` gives zeros.
    """
    if not half_life_windows > 0 or not math.isfinite(half_life_windows):
        raise ValueError(f"half_life_windows must be a finite number > 0, got {half_life_windows}")
    n = windows.shape[0]
    if n == 0:
        return torch.zeros(windows.shape[1:], dtype=torch.float64)
    age = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    w = torch.pow(0.5, age / half_life_windows)
    w = (w / w.sum()).reshape(n, *([1] * (windows.dim() - 1)))
    return (w * windows.to(torch.float64)).sum(dim=0)


__all__ = ["LoadFlusher", "FlusherStats", "LoadWindows", "read_load", "smooth", "index_key", "dropped_key",
           "window_key", "window_start_ms"]
