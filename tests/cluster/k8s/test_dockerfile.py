"""The images' Dockerfiles (no Docker here): base image = the pinned Ray, sources that exist,
the package and its gRPC stubs installed with the project's pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILES = {"cpu": ROOT / "deploy/docker/Dockerfile.cpu", "cuda": ROOT / "deploy/docker/Dockerfile.cuda"}


def _pin(name: str) -> str:
    m = re.search(rf"^{re.escape(name)}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert m, f"{name} is not pinned in constraints.txt"
    return m.group(1)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_builds_on_the_pinned_ray_and_installs_the_package(flavour):
    text = DOCKERFILES[flavour].read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base.startswith(f"rayproject/ray:{_pin('ray')}-py311-")
    assert base.endswith("-cpu") == (flavour == "cpu")
    copied = set()
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"{DOCKERFILES[flavour].name} copies {path}, which does not exist"
            copied.add(path)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = set(setuptools["package-dir"].values())
    assert package_dirs <= copied, f"{DOCKERFILES[flavour].name} does not copy {sorted(package_dirs - copied)}"
    assert "-c constraints.txt ." in text                          # the package, with the project's pins
    assert "proto/generate.py" in text                             # the gRPC stubs inside the image
    assert "import moeyard.cluster.serving.app" in text            # Serve's import path imports in the image
    assert ("download.pytorch.org/whl/cpu" in text) == (flavour == "cpu")


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for p in (".venv", ".git", "tests"):
        assert p in ignored
