"""Asyncio front of the engine: one stepping thread, one stream per request.

The engine steps in a background thread while there is work; each request's
outputs reach its asyncio stream through ``call_soon_threadsafe``. New requests
and aborts are handed to that thread through a short-locked inbox, so the
event loop never waits for a model step. Admission is bounded: beyond
``max_waiting`` queued requests a new one is refused at once with
:class:`QueueFull` (clients must not retry into an overload). A stream that is
closed or cancelled aborts its request, which frees its KV blocks before the
next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moeyard.attention.engine import LLMEngine
from moeyard.attention.sequence import RequestError, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; the request was not admitted."""


class EngineFailed(RuntimeError):
    """A step failed for this request (e.g. its experts were unreachable)."""


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float
    num_blocks: int
    steps: int = 0
    """Model steps run so far."""


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._engine_lock = threading.Lock()       # held during a step
        self._inbox_lock = threading.Lock()
        self._wake = threading.Condition(self._inbox_lock)
        self._adds: list[_Add] = []
        self._aborts: list[str] = []
        self._adding = 0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- stepping thread ---------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._inbox_lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stop or self._adds or self._aborts or self.engine.has_unfinished()):
                    self._wake.wait()
                if self._stop:
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                self._adding = len(adds)  # still counted by admission until the scheduler holds them
            outputs: list[RequestOutput] = []
            with self._engine_lock:
                for rid in aborts:
                    self.engine.abort(rid)
                for a in adds:
                    try:
                        self.engine.add_request(a.request_id, a.prompt, a.params)
                    except RequestError as e:
                        outputs.append(RequestOutput(a.request_id, [], True, "error", error=str(e)))
                with self._inbox_lock:
                    self._adding = 0
                try:
                    outputs.extend(self.engine.step())
                except Exception as e:  # keep serving: fail this step's requests, not the engine
                    log.exception("engine step failed")
                    with self._inbox_lock:
                        failed = list(self._streams)
                    for rid in failed:
                        self.engine.abort(rid)
                        outputs.append(RequestOutput(rid, [], True, "error", error=f"{type(e).__name__}: {e}"))
            self._deliver(outputs)

    # -- asyncio side ------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs.

        Raises :class:`RequestError` or :class:`QueueFull` before the first
        output, :class:`EngineFailed` if a step fails for this request.
        """
        self.engine.validate_request(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._wake:
            if request_id in self._streams:
                raise RequestError(f"duplicate request id {request_id!r}")
            if len(self.engine.scheduler.waiting) + len(self._adds) + self._adding >= self.max_waiting:
                raise QueueFull(f"server is at capacity ({self.max_waiting} requests waiting); try again later")
            self._streams[request_id] = (loop, queue)
            self._adds.append(_Add(request_id, list(prompt_token_ids), params))
            self._wake.notify()
        finished = False
        try:
            while True:
                out = await queue.get()
                if out.error:
                    finished = True
                    raise EngineFailed(out.error)
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
            self._wake.notify()

    def stats(self) -> EngineStats:
        with self._engine_lock:
            s = self.engine.scheduler
            return EngineStats(len(s.running), len(s.waiting), self.engine.blocks.usage(),
                               self.engine.blocks.num_blocks, self.engine.num_steps)

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)
