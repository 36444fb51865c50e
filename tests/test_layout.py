"""The shape of the house, read from heron's own imports with ``ast`` (nothing is imported):
rooms import only downwards, the kernels are a leaf, no import circles, and the API side
imports no torch when it loads.

    server -> engine -> loader -> models -> layers -> kernels      (kernels: the leaves only)

The leaves, heron.cache (disk cache) and heron.progress (load-step progress), import nothing
from heron; anything may import them.

An import is "top" (runs when the module loads), "local" (inside a function: runs when called)
or "type" (under ``if TYPE_CHECKING:``). Direction and circles count all three; the torch rule
counts what runs at load time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("kernels", "layers", "models", "loader", "engine", "server")  # lowest first
LEAVES = ("heron.cache", "heron.heap", "heron.progress")
KERNELS_MAY_IMPORT = ("heron.kernels", *LEAVES)
API_SIDE = ("heron.server", "heron.structured", "heron.tokenizer")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a heron module, or a third-party package's top-level name
    kind: str  # "top", "local" or "type"
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target} ({self.kind})"


@cache
def modules() -> dict[str, Path]:
    """Every heron module by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((REPO / "heron").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@cache
def imports() -> tuple[Import, ...]:
    return tuple(i for name, path in modules().items() for i in _imports_of(name, path))


def _imports_of(name: str, path: Path) -> Iterator[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _imports_in(name, package, path.read_text())


def _imports_in(name: str, package: str, source: str) -> Iterator[Import]:
    for node, kind in _walk(ast.parse(source), "top"):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, _resolve(alias.name), kind, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                yield Import(name, _resolve(f"{base}.{alias.name}", base), kind, node.lineno)


def _walk(node: ast.AST, kind: str) -> Iterator[tuple[ast.AST, str]]:
    """Every import statement under ``node`` with its kind."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, kind
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(child, "local" if kind == "top" else kind)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), "type")
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), kind)
        else:
            yield from _walk(child, kind)


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[:len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _resolve(name: str, fallback: str | None = None) -> str:
    """A heron module name (``from a import b``: ``a.b`` if that is a module, else ``a``), or
    a third-party package's top-level name."""
    if not name.startswith("heron"):
        return (fallback or name).split(".")[0]
    while name not in modules() and "." in name:
        name = name.rpartition(".")[0]
    return name


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def _climbs(i: Import) -> bool:
    """A lower room importing a higher one."""
    low, high = room_of(i.source), room_of(i.target)
    return low is not None and high is not None and ROOMS.index(high) > ROOMS.index(low)


def test_rooms_import_only_downwards() -> None:
    climbing = [str(i) for i in imports() if _climbs(i)]
    assert not climbing, "a lower room imports a higher one:\n" + "\n".join(climbing)


def test_kernels_import_only_the_disk_cache() -> None:
    leaks = [str(i) for i in imports() if room_of(i.source) == "kernels"
             and i.target.startswith("heron") and not i.target.startswith(KERNELS_MAY_IMPORT)]
    assert not leaks, "\n".join(leaks)


def test_leaves_import_nothing_from_heron() -> None:
    leaks = [str(i) for i in imports() if i.source in LEAVES and i.target.startswith("heron")]
    assert not leaks, "\n".join(leaks)


def _load_time_graph() -> dict[str, set[str]]:
    """module -> heron modules and packages it loads when it loads (a submodule's import loads
    its parent packages too)."""
    graph: dict[str, set[str]] = {name: set() for name in modules()}
    for i in imports():
        if i.kind == "top":
            graph[i.source] |= {i.target, *_parents(i.target)} - {i.source}
    for name in modules():
        graph[name] |= set(_parents(name))
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _chain_to(start: str, graph: dict[str, set[str]], wanted: str) -> list[str] | None:
    """The load-time path from ``start`` to a module importing ``wanted`` at load time."""
    direct = {i.source for i in imports() if i.kind == "top" and i.target == wanted}
    seen, queue = {start: [start]}, [start]
    while queue:
        here = queue.pop(0)
        if here in direct:
            return seen[here]
        for there in sorted(graph[here] - seen.keys()):
            if there in modules():
                seen[there] = [*seen[here], there]
                queue.append(there)
    return None


def test_api_side_modules_import_no_torch_when_they_load() -> None:
    graph = _load_time_graph()
    api = [m for m in modules() if m.startswith(API_SIDE)]
    chains = {m: chain for m in api if (chain := _chain_to(m, graph, "torch")) is not None}
    assert not chains, "\n".join(f"{m}: {' -> '.join(c)} -> torch" for m, c in chains.items())


def test_importing_the_server_app_imports_no_torch() -> None:
    code = ("import sys, heron.server.app\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _circles() -> list[set[str]]:
    """Strongly connected groups of modules (Tarjan), over every import kind. The root package's
    load by its submodules is left out: ``heron/__init__`` reaches ``LLM`` lazily by design."""
    graph: dict[str, set[str]] = {name: set() for name in modules()}
    for i in imports():
        if i.target in modules() and i.target != i.source:
            graph[i.source].add(i.target)
    return [group for group in _strongly_connected(graph) if len(group) > 1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _type_only_inside_engine(group: set[str]) -> bool:
    inner = [i for i in imports() if i.source in group and i.target in group]
    return all(room_of(m) == "engine" for m in group) and all(i.kind == "type" for i in inner)


def test_no_import_circles_but_a_type_only_one_inside_the_engine() -> None:
    circles = [sorted(g) for g in _circles() if not _type_only_inside_engine(g)]
    assert not circles, f"import circles: {circles}"


SAMPLE = """
from __future__ import annotations
import torch.nn
from typing import TYPE_CHECKING
from heron.engine import sampler
from heron.engine.request import Request
from . import runner
if TYPE_CHECKING:
    from heron.server.app import build_app
else:
    import numpy
class Loop:
    def run(self) -> None:
        import heron.cache
"""


def test_the_reader_finds_each_kind_of_import() -> None:
    found = {(i.target, i.kind, i.line)
             for i in _imports_in("heron.engine.core", "heron.engine", SAMPLE)}
    assert found == {
        ("__future__", "top", 2), ("torch", "top", 3), ("typing", "top", 4),
        ("heron.engine.sampler", "top", 5), ("heron.engine.request", "top", 6),
        ("heron.engine.runner", "top", 7), ("heron.server.app", "type", 9),
        ("numpy", "top", 11), ("heron.cache", "local", 14)}
    assert _climbs(Import("heron.engine.core", "heron.server.app", "type", 9))
    assert not _climbs(Import("heron.server.app", "heron.engine.core", "top", 1))
    assert room_of("heron.kernels.cpu.build") == "kernels" and room_of("heron.cache") is None
