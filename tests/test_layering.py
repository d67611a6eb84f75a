"""Layering of the two packages, read from the source with `ast` (issue #10).

- No import cycle between modules of `sdexport` and `runtime`.  Function-local imports count, and so
  do imports under `if TYPE_CHECKING:`: a cycle hidden from the interpreter is still two modules that
  each need the other (runtime/samplers <-> schedulers was one).
- `runtime` (what a deployed artifact needs) never imports `sdexport`, `transformers` or `diffusers`.
- Importing every `runtime` module works in a process where those packages (and scipy) cannot be
  imported at all.

An import edge goes to the module named (`from a.b import c` to `a.b.c` when that is a module, else
to `a.b`); the parent packages' `__init__` that Python also runs are not edges, or every package
would form a cycle with its own submodules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdexport", "runtime")
RUNTIME_FORBIDDEN = ("sdexport", "transformers", "diffusers")


def _module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _imports(module: str, path: Path, modules: frozenset[str]) -> set[str]:
    """What `module` imports: `import a.b` gives a.b; `from a import b` gives a.b when that is one of
    `modules`, else a (b is then a name defined in a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = _module_files()
    modules = frozenset(files)
    return {
        module: {n for n in _imports(module, path, modules) if n in files} - {module} for module, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: set[str] = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def test_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(map(sorted, _cycles(graph))) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycles() -> None:
    cycles = sorted(sorted(c) for c in _cycles(_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_runtime_imports_no_model_code() -> None:
    files = _module_files()
    modules = frozenset(files)
    bad = {
        module: sorted(n for n in _imports(module, path, modules) if n.split(".")[0] in RUNTIME_FORBIDDEN)
        for module, path in files.items()
        if module.split(".")[0] == "runtime"
    }
    bad = {m: names for m, names in bad.items() if names}
    assert not bad, f"runtime imports model code: {bad}"


_BLOCKED_IMPORT = """
import importlib, pkgutil, sys

BLOCKED = ("sdexport", "transformers", "diffusers", "scipy")

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Blocker())
import runtime
names = sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime."))
for name in names:
    importlib.import_module(name)
import runtime.ops
runtime.ops.load()
print(len(names), "runtime modules imported")
"""


def test_runtime_imports_in_a_process_without_model_code() -> None:
    # A fresh interpreter with sdexport, transformers, diffusers and scipy unimportable: every
    # runtime module (and the compiled op library) still imports.
    res = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "runtime modules imported" in res.stdout
