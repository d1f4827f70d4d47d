"""The package's import graph: no circles (issue 27), so a module can be read, changed and tested from the bottom up."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_graph():
    modules = {}
    for folder, _, files in os.walk(os.path.join(REPO, "recbole_llm")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # imports inside functions count too: they are edges all the same
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            targets = [name for name in names if name in modules and name not in ("recbole_llm", module)]
            if targets:
                graph[module].add(max(targets, key=len))
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    assert _cycles(_import_graph()) == []


def test_the_core_knows_no_model():
    """The config, its checks, the registry and the file helpers import no model, trainer or run module."""
    graph = _import_graph()
    core = ("recbole_llm.keys", "recbole_llm.validation", "recbole_llm.registry", "recbole_llm.errors",
            "recbole_llm.fileio", "recbole_llm.fingerprint", "recbole_llm.faults", "recbole_llm.data.locate",
            "recbole_llm.cached_model")
    upward = ("recbole_llm.model", "recbole_llm.trainer", "recbole_llm.quick_start", "recbole_llm.cli")
    for module in core:
        assert not [t for t in graph[module] if t.startswith(upward)], (module, graph[module])


LASER = ("recbole_llm.model.sequential_recommender.laser", "recbole_llm.model.sequential_recommender.mformer",
         "recbole_llm.model.frozen_sr", "recbole_llm.trainer.laser_trainer")
SERALM = ("recbole_llm.model.sequential_recommender.seralm", "recbole_llm.trainer.alignment_trainer",
          "recbole_llm.trainer.alignment_loss", "recbole_llm.trainer.alignment_resume", "recbole_llm.trainer.generator",
          "recbole_llm.data.knowledge")
SHARED_SIDE_MODELS = ("recbole_llm.cached_model", "recbole_llm.trainer.cached_recommender", "recbole_llm.trainer.safe",
                      "recbole_llm.trainer.resume")


def test_a_method_knows_no_other_method():
    """Laser and SeRALM share only core modules (a cached side model, safe checkpoints, resume), not each other's."""
    graph = _import_graph()
    for module in LASER:
        assert not graph[module] & set(SERALM), (module, graph[module])
        assert "recbole_llm.model.sequential_recommender.paup" not in graph[module]
    for module in SERALM:
        assert not graph[module] & set(LASER), (module, graph[module])
    for module in SHARED_SIDE_MODELS:
        assert not graph[module] & set(LASER + SERALM), (module, graph[module])
