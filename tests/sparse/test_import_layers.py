"""The sparse engine's import graph goes one way: each module of sparse_mim/sparse imports only modules of
lower layers (`sparse_mim.sparse.LAYERS`), at its top, never inside a function (a deferred import is how a
cycle hides). Checked on the source with `ast`, so an import that only runs in some code path counts too;
negative controls show that the checker flags a cycle, an upward or same-layer import and a deferred one."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import sparse_mim.sparse as engine

PACKAGE = "sparse_mim.sparse"
ENGINE_DIR = Path(engine.__file__).parent


class _Imports(ast.NodeVisitor):
    """(target module, line, deferred) for every import of a module of ``package`` in one module's source."""

    def __init__(self, package: str, modules: set[str], module: str):
        self.package, self.modules, self.module = package, modules, module
        self.depth = 0  # > 0 inside a function or class body
        self.found: list[tuple[str, int, bool]] = []

    def _scope(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope

    def _add(self, dotted: str, line: int) -> None:
        prefix = self.package + "."
        if dotted.startswith(prefix):
            name = dotted[len(prefix):].split(".")[0]
            if name in self.modules and name != self.module:
                self.found.append((name, line, self.depth > 0))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node):
        if node.level:
            parts = self.package.split(".")  # every module of the engine sits directly in the package
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base == self.package:  # `from . import functional`: the names are the modules
            for alias in node.names:
                self._add(f"{base}.{alias.name}", node.lineno)
        else:
            self._add(base, node.lineno)


def import_graph(sources: dict[str, str], package: str = PACKAGE) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported engine module, line, deferred)] for the modules' sources (name -> text)."""
    graph = {}
    for name, text in sources.items():
        visitor = _Imports(package, set(sources), name)
        visitor.visit(ast.parse(text))
        graph[name] = visitor.found
    return graph


def find_cycle(graph) -> list[str] | None:
    """One import cycle (a list of modules, first == last) of the graph, top-level and deferred imports alike."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for target, _, _ in graph.get(m, ()):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def layer_violations(graph, layers, facade: str = "__init__") -> list[str]:
    """Every import that breaks the layer list: undeclared modules, imports of the same or a higher layer,
    and any import of an engine module inside a function (``facade``, the package module, may import all)."""
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    problems = [f"{m} is in no layer: add it to LAYERS" for m in sorted(graph) if m != facade and m not in level]
    for m, imports in sorted(graph.items()):
        for target, line, deferred in imports:
            if deferred:
                problems.append(f"{m}:{line} imports {target} inside a function")
            if m != facade and m in level and target in level and level[target] >= level[m]:
                problems.append(f"{m}:{line} (layer {level[m]}) imports {target} (layer {level[target]})")
    return problems


def engine_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(ENGINE_DIR.glob("*.py"))}


def test_engine_imports_follow_the_layers():
    graph = import_graph(engine_sources())
    assert {"tensor", "geometry", "functional", "kernels", "dispatch", "nn", "convert"} <= set(graph)
    assert layer_violations(graph, engine.LAYERS) == []
    assert find_cycle(graph) is None


def test_bottom_layer_imports_nothing_of_the_engine():
    graph = import_graph(engine_sources())
    for m in engine.LAYERS[0]:
        assert graph.get(m, []) == [], m


def test_layers_are_written_in_the_package_docstring():
    doc = engine.__doc__
    for i, layer in enumerate(engine.LAYERS):
        assert f"{i}  {', '.join(layer)} " in doc, (i, layer)


# ---------------------------------------------------------------------------------------------------- negative controls
def _sources(**modules: str) -> dict[str, str]:
    return {name: textwrap.dedent(text) for name, text in modules.items()}


def test_checker_flags_a_cycle_hidden_in_a_deferred_import():
    graph = import_graph(_sources(
        tensor="""
            def torch_function(*args):
                from .dispatch import handle  # deferred: closes the cycle
                return handle(*args)
        """,
        dispatch="from .tensor import torch_function\n",
    ))
    assert graph["tensor"] == [("dispatch", 3, True)] and graph["dispatch"] == [("tensor", 1, False)]
    assert find_cycle(graph) == ["dispatch", "tensor", "dispatch"]
    problems = layer_violations(graph, (("tensor",), ("dispatch",)))
    assert problems == ["tensor:3 imports dispatch inside a function",
                        "tensor:3 (layer 0) imports dispatch (layer 1)"]


def test_checker_flags_upward_same_layer_and_undeclared_imports():
    graph = import_graph(_sources(
        tensor="",
        functional="from . import kernels as K\n",  # upward, through `from . import`
        kernels="import sparse_mim.sparse.tensor\nfrom sparse_mim.sparse import report\n",
        report="from .kernels import x\n",  # same layer
        extra="",
        __init__="from . import functional, kernels\n",  # the facade may import anything
    ))
    assert find_cycle(graph) == ["kernels", "report", "kernels"]
    problems = layer_violations(graph, (("tensor",), ("functional",), ("kernels", "report")))
    assert problems == ["extra is in no layer: add it to LAYERS",
                        "functional:1 (layer 1) imports kernels (layer 2)",
                        "kernels:2 (layer 2) imports report (layer 2)",
                        "report:1 (layer 2) imports kernels (layer 2)"]


def test_checker_passes_a_layered_graph_and_ignores_outside_imports():
    graph = import_graph(_sources(
        tensor="import torch\nfrom ..utils.misc import to_pair\n",
        geometry="from .tensor import SparseMap\n",
        functional="from . import geometry\n\ndef f():\n    import spconv  # an optional third-party import\n",
    ))
    assert graph == {"tensor": [], "geometry": [("tensor", 1, False)], "functional": [("geometry", 1, False)]}
    assert layer_violations(graph, (("tensor",), ("geometry",), ("functional",))) == []
    assert find_cycle(graph) is None
