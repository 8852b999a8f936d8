"""``moeyard.*`` from a source tree that was never installed.

A machine that only got a copy of the checkout (a lent GPU box with torch, grpcio and protobuf, and no
setuptools to install with) runs ``python -c "import moeyard.source_tree; ..."`` from the tree's root:
this maps the sub-packages onto the top-level folders exactly as ``pyproject.toml``'s ``package-dir``
does for an install (``moeyard.model`` -> ``model/``, ...). Where moeyard is installed it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``moeyard.<sub-package>`` in the folder ``package-dir`` names for it."""

    def __init__(self, package_dir: dict[str, str]):
        self.folders = {name: ROOT / folder for name, folder in package_dir.items() if name != "moeyard"}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        # the folder's own name may differ from the sub-package's last part: look it up, then rename
        spec = importlib.machinery.PathFinder.find_spec(folder.name, [str(folder.parent)])
        if spec is None:
            return None
        return importlib.util.spec_from_file_location(fullname, spec.origin,
                                                      submodule_search_locations=[str(folder)])


def install() -> bool:
    """Add the finder unless the sub-packages already import; True if it was added."""
    if any(isinstance(f, SourceTreeFinder) for f in sys.meta_path):
        return False
    if importlib.util.find_spec("moeyard.model") is not None:
        return False
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sys.meta_path.append(SourceTreeFinder(pyproject["tool"]["setuptools"]["package-dir"]))
    return True


install()
