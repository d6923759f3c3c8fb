"""Rules of the code's layout that a review found broken once (issue 21), checked on the source.

* the server reaches its database through ``Store`` (and the ``Unit`` it hands out) only;
* ONNX Runtime sessions are opened in one place, ``edge_runtime/core/onnx_session.py``;
* a class name means one thing: no two classes of ours share a name like ``Timeline`` did.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGES = ("edge_runtime", "sync_server", "export", "fleet_demo")


def _modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py") if "migrations" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Dotted names a module imports (``from .db import queries`` gives ``.db.queries``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            sep = "" if base.endswith(".") else "."
            out |= {base} | {f"{base}{sep}{a.name}" for a in node.names}
    return out


def test_the_server_reaches_its_database_only_through_the_store():
    direct = {}
    for path in _modules("sync_server"):
        rel = path.relative_to(REPO / "sync_server")
        if rel.parts[0] == "db" or rel.name == "store.py":
            continue
        hits = {name for name in _imports(path) if name.split(".")[-1] in ("queries", "bookkeeping")
                or ".db." in name or name.endswith(".db")}
        if hits:
            direct[str(rel)] = sorted(hits)
    assert direct == {}, f"modules importing the data-access layer beside Store: {direct}"


def test_onnx_runtime_sessions_are_opened_in_one_place():
    opened = []
    for path in _modules(*PACKAGES):
        if path.name == "onnx_session.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("InferenceSession",
                                                                                                           "SessionOptions"):
                opened.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert opened == [], f"sessions opened outside onnx_session.cpu_session: {opened}"


def test_no_two_classes_of_ours_share_a_name():
    where = defaultdict(list)
    for path in _modules(*PACKAGES):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(REPO)))
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert shared == {}, f"one name, several classes: {shared}"


def test_the_learner_imports_numpy_and_nothing_that_reads_images_models_or_the_network():
    import subprocess
    import sys

    code = ("import sys, infantino.edge_runtime.learner\n"
            "heavy = ('PIL', 'cv2', 'onnxruntime', 'sklearn', 'torch', 'urllib.request', 'http.client',\n"
            "         'infantino.edge_runtime.sync', 'infantino.edge_runtime.core.preprocess', 'infantino.edge_runtime.device')\n"
            "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------- import direction
# core <- device <- sync / watch / annotate / cli; server, export and demo above the edge runtime.
# The core is everybody's library (the server, the exporter and the demo import it too); it may
# import nothing of the device above it, not even inside a function.
CORE = {"edge_runtime.core"} | {f"edge_runtime.core.{m}" for m in (
    "classes", "preprocess", "haar", "blazeface", "facecrop", "facefinder", "onnx_session", "extractor", "head",
    "head_sklearn", "mlp", "wire", "package", "atomic", "backoff", "clitools", "safe_npz", "personal", "metrics",
    "splits", "imagefolder", "replay", "uncertainty", "datasets", "release")}
UPPER = ("edge_runtime.sync", "edge_runtime.watch", "edge_runtime.annotate", "edge_runtime.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (annotations, not imports)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports, at module level or inside functions."""
    paths = {_module_name(p): p for p in _modules(*PACKAGES)}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip, package = _type_checking_only(tree), path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = mod.split(".")[: len(mod.split(".")) - (node.level - (1 if package else 0))] if node.level else []
                base += [node.module.removeprefix("infantino.")] if node.module else []
                names = [".".join(base + [a.name]) if ".".join(base + [a.name]) in paths else ".".join(base) for a in node.names]
            for name in names:
                name = name.removeprefix("infantino.")
                while name and name not in paths and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in paths and name != mod:
                    graph[mod].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_imports_go_one_way_core_then_device_then_sync_watch_annotate_then_server_export_demo():
    graph = import_graph()
    assert CORE <= set(graph), sorted(CORE - set(graph))
    wrong = []
    for mod, targets in graph.items():
        ours = {t for t in targets if t.startswith("edge_runtime.")}
        if mod in CORE:
            wrong += [f"{mod} -> {t} (core imports the device)" for t in ours - CORE]
        elif mod.startswith("edge_runtime.") and not mod.startswith(UPPER):
            wrong += [f"{mod} -> {t} (the device imports what sits on it)" for t in ours if t.startswith(UPPER)]
        if mod.startswith("edge_runtime"):
            wrong += [f"{mod} -> {t} (the edge runtime imports a workstation or server package)" for t in targets
                      if t.split(".")[0] in ("sync_server", "export", "fleet_demo")]
        if mod.startswith(("sync_server", "export")):
            other = "export" if mod.startswith("sync_server") else "sync_server"
            wrong += [f"{mod} -> {t} (server and exporter stay apart)" for t in targets if t.startswith(other)]
    assert wrong == []


def test_no_module_of_ours_imports_itself_back_round_a_circle():
    assert _cycles(import_graph()) == []
