"""Read the output sink counters of the ingress that serves a given API address."""

from __future__ import annotations

import time

from moeyard.cluster.serving.ingress import OutputSinkStats


def ingress_sink_stats(api_address: str, timeout_s: float = 30.0) -> OutputSinkStats:
    """``ApiIngress.output_sink_stats`` of the ingress listening on ``api_address``.

    Right after a redeploy the previous ingress may still be draining and answer a handle
    call, so calls are repeated until the ingress that serves ``api_address`` answers.
    """
    from ray import serve

    from moeyard.cluster.serving.app import APP_NAME

    deadline = time.monotonic() + timeout_s
    while True:
        stats = serve.get_app_handle(APP_NAME).output_sink_stats.remote().result(timeout_s=timeout_s)
        if stats is not None and stats.api_address == api_address:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"no ingress serving {api_address} answered (last: {stats})")
        time.sleep(0.2)
