"""Overload load test: a storm of concurrent streams against a local cluster.

    .venv/bin/python -m bench.bench_load [--streams 256] [--storms 2] [--replicas 1] [--waves 2] [--json]

Starts the whole stack on loopback, in this process's own local Ray (``ray.init(address="local")``,
never ``ray start``): a real ``redis-server`` (:class:`moeyard.cluster.infra.redis_server.LocalRedis`, so load
statistics, telemetry and the dashboard run), then the Serve application the way ``moeyard up``
deploys it (:func:`moeyard.cluster.cli.local_cluster.deploy`) with a small mixtral (2 layers, hidden 128,
8 experts, top-2, vocab 512, bf16; ``--model DIR`` for another), 2 expert shards, ``--replicas``
attention replicas and a deliberately small admission bound (``--max-num-seqs 32
--max-waiting 64``: per replica at most 32 running and 64 waiting requests, beyond that
RESOURCE_EXHAUSTED at once).

Waves, all from one asyncio client process spread over ``--channels`` gRPC channels (each its
own connection):

0. warm-up: a full batch per replica (``--max-num-seqs`` x replicas requests, so that the
   largest decode batch has run); then the *start* memory sample;
1. ``--storms`` storms (2 by default), one after another: ``--streams`` streaming Generate
   calls opened at once, each a random token-id prompt (seeded), ``--max-new-tokens`` tokens,
   ``ignore_eos``, a per-call deadline (``--deadline-s``); a storm is bounded by
   ``--duration-s``, after which what is left is cancelled (counted as ``cancelled``); a
   memory sample after each (``stormN``). The second storm shows whether memory keeps
   growing: bounded means it does not (the first one may still grow allocator pools, since its
   prefill batches are larger than the warm-up's);
2. (``--waves 2``) recovery: a normal batch of 8 requests, which must all complete; then the
   *end* memory sample.

Per stream: completed (a ``finish_reason``), rejected (RESOURCE_EXHAUSTED: the time to the
rejection is recorded, p50/p99, it must be small: clients must not retry into an overload),
failed (any other status code, counted by code). Of the completed: time to first token, gap
between streamed chunks (ITL) and end-to-end latency, p50/p90/p99; throughput in generated
tokens per second of storm wall time. The server's own counts (the dashboard's ``/metrics``,
aggregated from the replicas' telemetry in Redis) are shown beside the client's.

Memory: the RSS of every process of the cluster (this process's process tree: the Ray GCS and
raylet, the Ray workers of the expert shards, attention replicas, API ingress, dashboard,
autoscaler, shard manager and Serve controller, the Ray agents, redis-server, and this client)
is sampled every ``--sample-s`` seconds; per process and per role the report gives the RSS at
every mark (start, after each storm, end) and the peak from the start on. During each storm
the dashboard's ``/metrics`` is polled for the most requests running / waiting a replica
reported (the admission bound: waiting never above ``--max-waiting``).

Everything runs on 127.0.0.1 and is torn down at the end: the app is deleted, the shards are
killed, Serve and the local Ray are shut down, redis-server is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import print_machine

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported (it reads this at import)

SMALL_MODEL = {"family": "mixtral", "layers": 2, "hidden": 128, "intermediate": 256, "experts": 8, "top_k": 2,
               "heads": 4, "kv_heads": 2, "vocab": 512, "dtype": "bfloat16", "seed": 0}
RECOVERY_STREAMS = 8
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def pcts(values: list[float], qs=(50, 90, 99), scale: float = 1000.0) -> dict:
    """Percentiles in milliseconds (``scale``), plus the count and max."""
    out = {f"p{q}": (None if pct(values, q) is None else round(pct(values, q) * scale, 2)) for q in qs}
    out["min"] = round(min(values) * scale, 2) if values else None
    out["max"] = round(max(values) * scale, 2) if values else None
    out["n"] = len(values)
    return out


# -- memory ---------------------------------------------------------------------------------------

def classify(pid: int, name: str, cmdline: list[str], self_pid: int) -> str:
    """The role of a process of the cluster, from its name and (Ray-set) process title."""
    if pid == self_pid:
        return "bench client (driver)"
    cmd = " ".join(cmdline)
    if name.startswith("redis-server") or "redis-server" in (cmdline[0] if cmdline else ""):
        return "redis-server"
    if name == "gcs_server":
        return "ray gcs_server"
    if name == "raylet":
        return "ray raylet"
    if cmd.startswith("ray::"):  # a Ray worker: its title names the actor (and the running method)
        title = cmd.split()[0]
        # Serve replicas: ray::SERVE_REPLICA::<app>#<Deployment>#<id> (older Ray: ServeReplica:<app>:<Deployment>)
        for key, role in (("DashboardAgent", "ray agents"), ("RuntimeEnvAgent", "ray agents"),
                          ("AttentionReplica", "attention replica"), ("ApiIngress", "API ingress"),
                          ("ShardManager", "shard manager"), ("Autoscaler", "autoscaler"),
                          ("#Dashboard#", "dashboard"), (":Dashboard", "dashboard"),
                          ("ExpertShardActor", "expert shard"), ("ServeController", "serve controller"),
                          ("IDLE", "ray idle worker")):
            if key in title:
                return role
        return "ray worker (other)"
    if "default_worker.py" in cmd:
        return "ray worker (starting)"
    if "/ray/" in cmd:  # Ray's own daemons (log monitor, autoscaler monitor, agents)
        return "ray agents"
    return "other"


def short_title(cmdline: list[str]) -> str:
    """A Ray worker's title, or the script (``.py``) or executable a process runs."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0][:60]
    for a in cmdline[1:]:
        if a.endswith(".py"):
            return os.path.basename(a)
    return os.path.basename(cmdline[0].split()[0])[:60]


@dataclass
class ProcInfo:
    pid: int
    role: str
    title: str
    rss: dict = field(default_factory=dict)
    """mark name -> RSS bytes at that mark (``start``, ``end``)."""
    peak: int = 0
    last: int = 0


class RssSampler:
    """Samples the RSS of this process and all its descendants every ``interval`` seconds (a thread)."""

    def __init__(self, interval: float):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.root = psutil.Process(os.getpid())
        self.procs: dict[int, ProcInfo] = {}
        self._handles: dict[int, object] = {}
        self.role_peak: dict[str, int] = {}
        self.role_marks: dict[str, dict[str, int]] = {}
        self.total_series: list[tuple[float, int]] = []
        self.total_peak = 0
        self.setup_peak = 0
        """Total RSS peak before the start mark (deploy, warm-up)."""
        self.measuring = False
        """Peaks count from the start mark on (setup peaks, e.g. workers importing, are not the storm's)."""
        self.samples = 0
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as e:  # never let sampling break the run
                log(f"rss sample failed: {type(e).__name__}: {e}")

    def sample(self, mark: str | None = None) -> None:
        ps = self.psutil
        with self._lock:
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except ps.Error:
                return
            now: dict[int, int] = {}
            by_role: dict[str, int] = {}
            for p in procs:
                h = self._handles.setdefault(p.pid, p)
                try:
                    with h.oneshot():
                        rss = h.memory_info().rss
                        name = h.name()
                        cmdline = h.cmdline()
                except ps.Error:
                    continue
                info = self.procs.get(p.pid)
                role = classify(p.pid, name, cmdline, self.root.pid)
                if info is None:
                    info = self.procs[p.pid] = ProcInfo(p.pid, role, short_title(cmdline))
                elif role != info.role and not role.startswith("ray worker (starting)"):
                    # an idle worker that became an actor: it is the actor from now on
                    info.role, info.title = role, short_title(cmdline)
                if mark == "start":
                    self.measuring = True
                if self.measuring:
                    info.peak = max(info.peak, rss)
                info.last = rss
                if mark:
                    info.rss[mark] = rss
                now[p.pid] = rss
                by_role[info.role] = by_role.get(info.role, 0) + rss
            for role, v in by_role.items():
                if self.measuring:
                    self.role_peak[role] = max(self.role_peak.get(role, 0), v)
                if mark:
                    self.role_marks.setdefault(role, {})[mark] = v
            total = sum(now.values())
            if self.measuring:
                self.total_peak = max(self.total_peak, total)
            else:
                self.setup_peak = max(self.setup_peak, total)
            if mark:
                self.role_marks.setdefault("TOTAL", {})[mark] = total
            self.total_series.append((round(time.monotonic() - self.t0, 2), total))
            self.samples += 1

    def report(self) -> dict:
        with self._lock:
            marks = list(dict.fromkeys(mk for p in self.procs.values() for mk in p.rss))
            roles = {}
            counts = Counter(p.role for p in self.procs.values() if p.rss)
            for role in sorted(self.role_peak, key=lambda r: -self.role_peak[r]):
                if not self.role_marks.get(role):
                    continue  # came and went between the marks (a worker starting)
                roles[role] = {"processes": counts.get(role, 0), "peak_mib": _mib(self.role_peak[role]),
                               "marks": {mk: _mib(v) for mk, v in self.role_marks[role].items()}}
            roles["TOTAL"] = {"processes": sum(counts.values()), "peak_mib": _mib(self.total_peak),
                              "marks": {mk: _mib(v) for mk, v in self.role_marks.get("TOTAL", {}).items()}}
            procs = [{"pid": p.pid, "role": p.role, "title": p.title, "peak_mib": _mib(p.peak),
                      "marks": {mk: _mib(v) for mk, v in p.rss.items()}}
                     for p in sorted(self.procs.values(), key=lambda p: (p.role, p.pid)) if p.rss]
            step = max(1, len(self.total_series) // 120)
            series = [(t, _mib(v)) for t, v in self.total_series[::step]]
            return {"interval_s": self.interval, "samples": self.samples, "marks": marks, "by_role": roles,
                    "processes": procs, "setup_total_peak_mib": _mib(self.setup_peak), "total_series_mib": series}


def _mib(v: int | None) -> float | None:
    return None if v is None else round(v / MIB, 1)


# -- the client -----------------------------------------------------------------------------------

@dataclass
class StreamResult:
    outcome: str = "pending"
    """completed | rejected | failed | cancelled"""
    code: str | None = None
    start: float = 0.0
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    gaps: list = field(default_factory=list)
    finish_reason: str | None = None


def make_clients(addr: str, token: str, n: int):
    """``n`` clients, each on its own gRPC connection (a local subchannel pool: channels with the
    same target and arguments would otherwise share one connection)."""
    import grpc

    from moeyard import client as mc

    clients = []
    for i in range(n):
        c = mc.AsyncMoeyardClient(addr, token=token)
        opts = list(mc._CHANNEL_OPTIONS) + [("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)]
        old = c._channel
        c._channel = grpc.aio.insecure_channel(addr, options=opts)
        c._stub = mc.pb_grpc.InferenceStub(c._channel)
        clients.append((c, old))
    return clients


async def one_stream(client, prompt: list[int], n_new: int, deadline_s: float, rid: str) -> StreamResult:
    import grpc

    from moeyard.client import MoeyardError

    r = StreamResult(start=time.perf_counter())
    last = None
    try:
        async for ch in client.generate(prompt, max_new_tokens=n_new, ignore_eos=True, timeout=deadline_s,
                                        request_id=rid):
            now = time.perf_counter()
            if ch.token_ids:
                if r.first is None:
                    r.first = now
                if last is not None:
                    r.gaps.append(now - last)
                last = now
                r.tokens += len(ch.token_ids)
            if ch.finish_reason:
                r.finish_reason = ch.finish_reason
        r.end = time.perf_counter()
        if r.finish_reason:
            r.outcome = "completed"
        else:
            r.outcome, r.code = "failed", "NO_FINISH_REASON"
    except MoeyardError as e:
        r.end = time.perf_counter()
        if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            r.outcome, r.code = "rejected", e.code.name
        else:
            r.outcome, r.code = "failed", e.code.name
    except asyncio.CancelledError:
        r.end = time.perf_counter()
        r.outcome, r.code = "cancelled", "CANCELLED_BY_BENCH"
    except Exception as e:  # anything else is a failure of the call, by type
        r.end = time.perf_counter()
        r.outcome, r.code = "failed", type(e).__name__
    return r


async def run_wave(clients, prompts: list[list[int]], n_new: int, deadline_s: float, bound_s: float,
                   tag: str) -> tuple[list[StreamResult], float]:
    """Open every stream at once; cancel what is still running after ``bound_s``."""
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one_stream(clients[i % len(clients)][0], p, n_new, deadline_s,
                                            f"{tag}-{i:04d}"))
             for i, p in enumerate(prompts)]
    _, pending = await asyncio.wait(tasks, timeout=bound_s)
    for t in pending:
        t.cancel()
    if pending:
        log(f"{tag}: {len(pending)} streams still open after {bound_s:.0f} s: cancelled")
        await asyncio.wait(pending, timeout=30)
    results = []
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is None:
            results.append(t.result())
        else:
            results.append(StreamResult(outcome="cancelled", code="CANCELLED_BY_BENCH", start=t0))
    return results, time.perf_counter() - t0


def summarize(results: list[StreamResult], wall_s: float) -> dict:
    outcomes = Counter(r.outcome for r in results)
    comp = [r for r in results if r.outcome == "completed"]
    rej = [r for r in results if r.outcome == "rejected"]
    failed_codes = Counter(r.code for r in results if r.outcome == "failed")
    gaps = [g for r in comp for g in r.gaps]
    tokens_all = sum(r.tokens for r in results)
    tokens_done = sum(r.tokens for r in comp)
    span = (max(r.end for r in comp) - min(r.start for r in results)) if comp else wall_s
    return {
        "streams": len(results), "completed": outcomes.get("completed", 0), "rejected": outcomes.get("rejected", 0),
        "failed": outcomes.get("failed", 0), "cancelled": outcomes.get("cancelled", 0),
        "failed_by_code": dict(failed_codes),
        "reject_latency_ms": pcts([r.end - r.start for r in rej], (50, 99)),
        "ttft_ms": pcts([r.first - r.start for r in comp if r.first is not None]),
        "itl_ms": pcts(gaps),
        "e2e_ms": pcts([r.end - r.start for r in comp]),
        "tokens_generated": tokens_all, "tokens_completed": tokens_done,
        "wall_s": round(wall_s, 2), "completion_span_s": round(span, 2),
        "throughput_tok_s": round(tokens_done / span, 1) if span > 0 else None,
    }


# -- server side ----------------------------------------------------------------------------------

def server_counts(dashboard: str | None, token: str) -> dict | None:
    """The replicas' request counters as the dashboard's /metrics exports them (summed)."""
    if not dashboard:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(dashboard.rstrip("/") + "/metrics", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    out: Counter = Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "moeyard:request_success_total":
                out["success"] += s.value
            elif s.name == "moeyard:request_failure_total":
                out[f"failure:{s.labels.get('reason', '?')}"] += s.value
            elif s.name == "moeyard:generation_tokens_total":
                out["generation_tokens"] += s.value
    return {k: int(v) for k, v in out.items()}


def diff_counts(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b or "error" in a or "error" in b:
        return b
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b))}


def redis_used_mib(info) -> float | None:
    try:
        c = info.client(timeout=2)
        try:
            return round(c.info("memory")["used_memory"] / MIB, 2)
        finally:
            c.close()
    except Exception:
        return None


def replica_stats(app_name: str) -> dict | None:
    from ray import serve

    try:
        return serve.get_deployment_handle("AttentionReplica", app_name).stats.remote().result(timeout_s=15)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


# -- main -----------------------------------------------------------------------------------------

def random_prompts(n: int, vocab: int, lo: int, hi: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


class QueuePoller:
    """Polls the dashboard's /metrics (the replicas' telemetry, published every second) for the
    engine queues: the most requests running and waiting any replica reported."""

    def __init__(self, dashboard: str | None, token: str, interval_s: float = 1.0):
        self.dashboard, self.token, self.interval_s = dashboard, token, interval_s
        self.max_running = self.max_waiting = 0
        self.polls = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-poller", daemon=True)

    def start(self) -> QueuePoller:
        if self.dashboard:
            self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        return {"max_running": self.max_running, "max_waiting": self.max_waiting, "polls": self.polls,
                "errors": self.errors}

    def _run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(self.dashboard.rstrip("/") + "/metrics",
                                     headers={"Authorization": f"Bearer {self.token}"})
        while not self._stop.wait(self.interval_s):
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    text = resp.read().decode()
                for fam in text_string_to_metric_families(text):
                    for smp in fam.samples:
                        if smp.name == "moeyard:num_requests_running":
                            self.max_running = max(self.max_running, int(smp.value))
                        elif smp.name == "moeyard:num_requests_waiting":
                            self.max_waiting = max(self.max_waiting, int(smp.value))
                self.polls += 1
            except Exception:
                self.errors += 1


async def client_phases(args, addr: str, token: str, dashboard: str | None, sampler: RssSampler, vocab: int,
                        redis_info) -> dict:
    rng = random.Random(args.seed)
    clients = make_clients(addr, token, args.channels)
    for _, old in clients:
        await old.close()
    out: dict = {"storms": []}
    try:
        n_warm = args.warmup if args.warmup is not None else args.max_num_seqs * args.replicas
        log(f"warm-up: {n_warm} requests (a full batch per replica)")
        res, wall = await run_wave(clients, random_prompts(n_warm, vocab, args.prompt_min, args.prompt_max, rng),
                                   args.max_new_tokens, args.deadline_s, 120, "warmup")
        out["warmup"] = summarize(res, wall)
        await asyncio.sleep(args.settle_s)
        server_before = await asyncio.to_thread(server_counts, dashboard, token)
        out["redis_used_mib_start"] = await asyncio.to_thread(redis_used_mib, redis_info)
        await asyncio.to_thread(sampler.sample, "start")

        for k in range(1, args.storms + 1):
            log(f"storm {k}/{args.storms}: {args.streams} streams at once over {args.channels} channels "
                f"(bound {args.duration_s:.0f} s, deadline {args.deadline_s:.0f} s per call)")
            prompts = random_prompts(args.streams, vocab, args.prompt_min, args.prompt_max, rng)
            poller = QueuePoller(dashboard, token).start()
            res, wall = await run_wave(clients, prompts, args.max_new_tokens, args.deadline_s, args.duration_s,
                                       f"storm{k}")
            st = summarize(res, wall)
            await asyncio.sleep(args.settle_s)
            st["server_queue"] = await asyncio.to_thread(poller.stop)
            await asyncio.to_thread(sampler.sample, f"storm{k}")
            out["storms"].append(st)
            log(f"storm {k} done in {wall:.1f} s: completed {st['completed']}, rejected {st['rejected']}, "
                f"failed {st['failed']}, cancelled {st['cancelled']}")

        if args.waves >= 2:
            log(f"recovery: {RECOVERY_STREAMS} requests")
            res, wall = await run_wave(clients, random_prompts(RECOVERY_STREAMS, vocab, args.prompt_min,
                                                               args.prompt_max, rng),
                                       args.max_new_tokens, args.deadline_s, 120, "recovery")
            out["recovery"] = summarize(res, wall)
            await asyncio.sleep(args.settle_s)
        await asyncio.to_thread(sampler.sample, "end")
        out["redis_used_mib_end"] = await asyncio.to_thread(redis_used_mib, redis_info)
        server_after = await asyncio.to_thread(server_counts, dashboard, token)
        out["server_counts_after_warmup"] = diff_counts(server_before, server_after)
        from moeyard.cluster.serving.app import APP_NAME

        out["replica_stats_end"] = await asyncio.to_thread(replica_stats, APP_NAME)
    finally:
        for c, _ in clients:
            await c.close()
    return out


def checks(result: dict, args) -> dict:
    out: dict = {}
    for k, s in enumerate(result["storms"], 1):
        out[f"storm{k}_every_stream_accounted"] = (s["completed"] + s["rejected"] + s["failed"] + s["cancelled"]
                                                   == s["streams"])
        out[f"storm{k}_no_failures"] = s["failed"] == 0 and s["cancelled"] == 0
        out[f"storm{k}_rejection_p99_under_1s"] = s["rejected"] == 0 or (s["reject_latency_ms"]["p99"] or 0) < 1000
        q = s.get("server_queue") or {}
        if q.get("polls"):
            out[f"storm{k}_waiting_within_bound"] = q["max_waiting"] <= args.max_waiting
    if "recovery" in result:
        out["recovery_all_completed"] = result["recovery"]["completed"] == RECOVERY_STREAMS
    tot = result["memory"]["by_role"].get("TOTAL", {}).get("marks", {})
    n = len(result["storms"])
    before, last = tot.get(f"storm{n - 1}" if n > 1 else "start"), tot.get(f"storm{n}")
    if before and last:  # bounded: the last storm no longer grows the cluster's memory
        out["last_storm_total_rss_growth_under_2pct"] = last <= 1.02 * before
    return out


def print_report(r: dict) -> None:
    def ms(d: dict, k: str) -> str:
        v = d.get(k)
        return "-" if v is None else f"{v:.1f}"

    cfg = r["config"]
    print(f"\n== overload load test: {cfg['storms']} x {cfg['streams']} streams at once, {cfg['replicas']} attention "
          f"replica(s), {cfg['shards']} expert shards, max_num_seqs {cfg['max_num_seqs']} + max_waiting "
          f"{cfg['max_waiting']} per replica, {cfg['max_new_tokens']} new tokens, prompts "
          f"{cfg['prompt_len'][0]}-{cfg['prompt_len'][1]} tokens, model {cfg['model_desc']}")
    print(f"   setup {r['setup_s']:.1f} s, total {r['total_s']:.1f} s, host {cfg['cpus']} CPUs, "
          f"load average at start {cfg['loadavg_start']}\n")
    waves = [("warm-up", r.get("warmup"))] + [(f"storm {k}", s) for k, s in enumerate(r["storms"], 1)]
    waves.append(("recovery", r.get("recovery")))
    print(f"{'wave':<10}{'streams':>8}{'completed':>10}{'rejected':>10}{'failed':>8}{'cancel':>8}"
          f"{'wall s':>8}{'tok/s':>8}{'max run':>9}{'max wait':>9}")
    for name, s in waves:
        if s:
            q = s.get("server_queue") or {}
            print(f"{name:<10}{s['streams']:>8}{s['completed']:>10}{s['rejected']:>10}{s['failed']:>8}"
                  f"{s['cancelled']:>8}{s['wall_s']:>8.1f}{(s['throughput_tok_s'] or 0):>8.1f}"
                  f"{q.get('max_running', '-'):>9}{q.get('max_waiting', '-'):>9}")
            if s["failed_by_code"]:
                print(f"{'':<10}failed by code: {s['failed_by_code']}")
    print("(max run / max wait: the most requests running / waiting a replica reported, dashboard /metrics "
          "polled every 1 s)")
    for k, s in enumerate(r["storms"], 1):
        print(f"\n{f'storm {k} latency (ms)':<26}{'p50':>9}{'p90':>9}{'p99':>9}{'min':>9}{'max':>9}{'n':>6}")
        for label, key in (("time to rejection", "reject_latency_ms"), ("TTFT (completed)", "ttft_ms"),
                           ("ITL (completed)", "itl_ms"), ("end-to-end (completed)", "e2e_ms")):
            d = s[key]
            print(f"{label:<26}{ms(d, 'p50'):>9}{ms(d, 'p90'):>9}{ms(d, 'p99'):>9}{ms(d, 'min'):>9}"
                  f"{ms(d, 'max'):>9}{d['n']:>6}")
    if "recovery" in r:
        d = r["recovery"]["e2e_ms"]
        print(f"{'recovery end-to-end':<26}{ms(d, 'p50'):>9}{ms(d, 'p90'):>9}{ms(d, 'p99'):>9}{ms(d, 'min'):>9}"
              f"{ms(d, 'max'):>9}{d['n']:>6}")
    sc = r.get("server_counts_after_warmup")
    if sc:
        print(f"\nserver-side counters after the warm-up (dashboard /metrics): {sc}")
    m = r["memory"]
    marks = m["marks"]
    print(f"\nRSS by role (MiB; sampled every {m['interval_s']} s, {m['samples']} samples; start = after the "
          f"warm-up; stormN = after storm N + {cfg['settle_s']:g} s; peak = from start on; end = after "
          f"everything; setup peak {m['setup_total_peak_mib']} MiB in total)")
    print(f"{'role':<24}{'procs':>6}" + "".join(f"{mk:>9}" for mk in marks) + f"{'peak':>9}{'end-start':>11}")
    for role, d in m["by_role"].items():
        v = d["marks"]
        delta = (v["end"] - v["start"]) if v.get("end") is not None and v.get("start") is not None else None
        print(f"{role:<24}{d['processes']:>6}" + "".join(f"{_f(v.get(mk)):>9}" for mk in marks)
              + f"{_f(d['peak_mib']):>9}{_f(delta, signed=True):>11}")
    print(f"\nRSS per process (MiB)\n{'role':<24}{'pid':>8}" + "".join(f"{mk:>9}" for mk in marks)
          + f"{'peak':>9}  title")
    for p in m["processes"]:
        print(f"{p['role']:<24}{p['pid']:>8}" + "".join(f"{_f(p['marks'].get(mk)):>9}" for mk in marks)
              + f"{_f(p['peak_mib']):>9}  {p['title'][:50]}")
    print(f"\nredis used_memory MiB: start {r.get('redis_used_mib_start')}, end {r.get('redis_used_mib_end')}")
    print(f"replica stats at the end: {r.get('replica_stats_end')}")
    print("\nchecks: " + ", ".join(f"{k}={'OK' if v else 'FAIL'}" for k, v in r["checks"].items()))


def _f(v, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a small mixtral in a temp dir)")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--channels", type=int, default=8, help="gRPC channels (connections) the streams spread over")
    ap.add_argument("--replicas", type=int, default=1, choices=(1, 2), help="attention replicas")
    ap.add_argument("--shards", type=int, default=2, help="expert shards")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-waiting", type=int, default=64, help="admission queue bound per replica")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-min", type=int, default=8)
    ap.add_argument("--prompt-max", type=int, default=64)
    ap.add_argument("--deadline-s", type=float, default=120.0, help="per-call gRPC deadline")
    ap.add_argument("--duration-s", type=float, default=180.0, help="bound of the storm; then the rest is cancelled")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up requests before the start sample (default: max-num-seqs x replicas)")
    ap.add_argument("--storms", type=int, default=2,
                    help="storms one after another (the second shows whether memory keeps growing)")
    ap.add_argument("--waves", type=int, default=2, choices=(1, 2), help="2: a recovery batch after the storm")
    ap.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling period")
    ap.add_argument("--settle-s", type=float, default=3.0, help="pause before the start and end samples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per shard and replica")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    args = ap.parse_args(argv)
    print_machine()
    if args.streams < 1 or args.channels < 1 or args.storms < 1:
        ap.error("--streams, --channels and --storms must be >= 1")

    # stdout carries only the report (--json: one JSON object); Ray's own messages go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        result = _run(args)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print_report(result)
    return 1 if args.strict and not all(result["checks"].values()) else 0


def _run(args) -> dict:
    t_begin = time.monotonic()
    loadavg_start = round(os.getloadavg()[0], 2)
    sampler = RssSampler(args.sample_s).start()
    work = Path(tempfile.mkdtemp(prefix="moeyard-bench-load-"))
    redis_info = None
    ray_started = False
    result: dict = {}
    try:
        from moeyard.cluster.cli.local_cluster import deploy, ensure_token, logical_cpus
        from moeyard.cluster.config import ClusterConfig, EngineSettings
        from moeyard.cluster.infra.redis_server import LocalRedis

        if args.model:
            model_dir, model_desc = Path(args.model), args.model
        else:
            from moeyard.model.make_model import make_model
            from moeyard.model.make_model_options import MakeModelOptions

            model_dir = work / "model"
            make_model(MakeModelOptions(**SMALL_MODEL), model_dir)
            model_desc = "mixtral L2 H128 E8 top2 V512 bf16"
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        token = ensure_token(work / "token")
        log("starting redis-server")
        redis_info = LocalRedis.start(work / "redis")
        cfg = ClusterConfig(
            model=str(model_dir), expert_shards=args.shards, attention_replicas=args.replicas,
            torch_threads=args.threads, api_token_file=str(work / "token"),
            engine=EngineSettings(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting),
            redis={"url": redis_info.url, "password_file": redis_info.password_file, "key_prefix": "benchload"})

        import logging

        import ray

        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialised in this process")
        log("starting a local Ray (in-process head) and deploying the app")
        ray.init(address="local", num_cpus=logical_cpus(cfg), namespace=cfg.namespace, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING, object_store_memory=200 << 20,
                 _node_ip_address="127.0.0.1")  # loopback only
        ray_started = True
        addr, dashboard = deploy(cfg, "local", timeout_s=240)
        setup_s = time.monotonic() - t_begin
        log(f"API {addr}, dashboard {dashboard}, ready after {setup_s:.1f} s")

        result = asyncio.run(client_phases(args, addr, token, dashboard, sampler, vocab, redis_info))
        result["setup_s"] = round(setup_s, 1)
    finally:
        sampler.stop()
        if ray_started:
            log("tearing down: delete the app, kill the shards, shut Serve and Ray down")
            _teardown()
        elif "ray" in sys.modules and sys.modules["ray"].is_initialized():  # ray.init failed half-way
            sys.modules["ray"].shutdown()
        if redis_info is not None:
            try:
                LocalRedis.stop(redis_info)
            except Exception as e:
                log(f"could not stop redis-server: {e}")
        shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.monotonic() - t_begin, 1)
    result["config"] = {"streams": args.streams, "channels": args.channels, "replicas": args.replicas,
                        "shards": args.shards, "max_num_seqs": args.max_num_seqs, "max_waiting": args.max_waiting,
                        "max_new_tokens": args.max_new_tokens, "prompt_len": [args.prompt_min, args.prompt_max],
                        "deadline_s": args.deadline_s, "duration_s": args.duration_s, "waves": args.waves,
                        "storms": args.storms, "settle_s": args.settle_s, "seed": args.seed, "model_desc": model_desc,
                        "cpus": os.cpu_count(), "loadavg_start": loadavg_start}
    result["memory"] = sampler.report()
    result["checks"] = checks(result, args)
    return result


def _teardown() -> None:
    import ray
    from ray import serve

    from moeyard.cluster.serving.app import APP_NAME

    ns = "moeyard"
    try:
        serve.delete(APP_NAME)
    except Exception as e:
        log(f"serve.delete failed: {type(e).__name__}: {e}")
    try:
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == ns and actor["name"].startswith(f"{ns}-shard-"):
                ray.kill(ray.get_actor(actor["name"], namespace=ns), no_restart=True)
    except Exception as e:
        log(f"killing shards failed: {type(e).__name__}: {e}")
    try:
        serve.shutdown()
    except Exception as e:
        log(f"serve.shutdown failed: {type(e).__name__}: {e}")
    ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
