"""CPU time per role of the processes of a benchmark (where the cores went).

``CpuMeter(root_pid).sample()`` reads the user+system CPU seconds of the bench
process and all its descendants (the local Ray cluster it started: GCS, raylet,
Serve controller, replicas, shards, ...) and sums them per role
(:func:`bench.bench_load.classify`). The difference of two samples taken
around a timed run says how many CPU-seconds each role spent in it; with the
wall time it also gives how busy the host was (``busy_cores``).
"""

from __future__ import annotations

import os
from collections import Counter

import psutil

from bench.bench_load import classify


class CpuMeter:
    def __init__(self, root_pid: int | None = None):
        self.root = psutil.Process(root_pid or os.getpid())
        self._roles: dict[int, str] = {}

    def _role(self, p: psutil.Process) -> str:
        role = self._roles.get(p.pid)
        if role is None:
            try:
                role = classify(p.pid, p.name(), p.cmdline(), self.root.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                role = "other"
            if role not in ("ray worker (starting)", "ray idle worker"):  # titles change once a worker starts
                self._roles[p.pid] = role
        return role

    def sample(self) -> dict[int, tuple[str, float]]:
        """pid -> (role, CPU seconds so far) for the root and every descendant alive now."""
        out = {}
        for p in [self.root] + self.root.children(recursive=True):
            try:
                t = p.cpu_times()
                out[p.pid] = (self._role(p), t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role spent between two :meth:`CpuMeter.sample` calls (processes that ended in
    between are not counted), largest first."""
    spent: Counter = Counter()
    for pid, (role, cpu) in after.items():
        spent[role] += cpu - before.get(pid, (role, 0.0))[1]
    return dict(spent.most_common())
