"""The house's import graph: arrows only go down, and every module imports on its own.

Every import of a project module counts, function-local ones included: a cycle hidden inside a
function is still a cycle (it only fails later, and in a different order for every caller).
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
PACKAGES = ["sparse_kernels"]


def project_imports(path: Path) -> set:
    """The project modules (top-level files and packages) that the file at path imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES + PACKAGES)


def import_graph() -> dict:
    graph = {m: project_imports(ROOT / f"{m}.py") for m in MODULES}
    for package in PACKAGES:
        graph[package] = set().union(*(project_imports(p) for p in (ROOT / package).glob("*.py"))) - {package}
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert {"model", "generate", "calibrate", "eval", "tp", "tokenizer", "loader", "teal"} <= set(graph)
    assert graph["model"] <= {"sparse_kernels"}, "model.py imports only the kernels"
    assert graph["sparse_kernels"] == set(), "the kernels import nothing of the project"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["model"] = graph["model"] | {"generate"}  # generate imports model (through loader) already
    assert find_cycle(graph) is not None


def test_each_module_imports_alone():
    """A fresh interpreter per module: no module relies on another having been imported first."""
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    for module in MODULES + PACKAGES:
        r = subprocess.run([sys.executable, "-c", code, module], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, f"import {module}: {r.stderr[-2000:]}"
