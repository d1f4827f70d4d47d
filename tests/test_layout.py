"""The package's import graph: no circles (issue 27), so a module can be read, changed and tested from the bottom up."""

import ast
import io
import os
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    """{dotted module name: file path} of every module of the package."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(REPO, "recbole_llm")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path
    return modules


def _import_graph():
    modules = _modules()
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # imports inside functions count too: they are edges all the same
            if isinstance(node, ast.ImportFrom) and node.module:
                # ``from package import a, b``: an edge to each submodule named, else to the module itself
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                names = [name for name in names if name in modules] or [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            graph[module].update(name for name in names if name in modules and name not in ("recbole_llm", module))
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


# folder -> the folders its modules may import (besides their own). core and llm know no method; a method knows core
# and llm; seralm also builds on PAUP as it builds on RecBole's SASRec (PAUP is a base recommender, not an LLM method);
# run knows all. The package's __init__ registers the models by name (registry strings, not imports).
MAY_IMPORT = {
    "core": set(),
    "llm": {"core"},
    "datasets": {"core"},
    "paup": {"core"},
    "laser": {"core", "llm"},
    "seralm": {"core", "llm", "paup"},
    "run": {"core", "llm", "datasets", "paup", "laser", "seralm"},
}


def _folder(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None  # None: the package's __init__


def test_every_module_sits_in_a_known_folder():
    assert {_folder(m) for m in _modules()} - {None} == set(MAY_IMPORT)


def _wrong_imports(graph):
    """{module: the modules it imports that its folder may not}"""
    wrong = {module: sorted(t for t in targets if _folder(t) not in MAY_IMPORT[_folder(module)] | {_folder(module)})
             for module, targets in graph.items() if _folder(module)}
    return {module: targets for module, targets in wrong.items() if targets}


def test_no_import_points_up_a_layer_or_into_another_method():
    assert _wrong_imports(_import_graph()) == {}


def test_the_folder_rules_catch_an_upward_or_sideways_import():
    graph = {"recbole_llm.core.config": {"recbole_llm.core.keys", "recbole_llm.laser.model"},
             "recbole_llm.laser.model": {"recbole_llm.seralm.model", "recbole_llm.llm.encode"},
             "recbole_llm.seralm.model": {"recbole_llm.paup.model"}, "recbole_llm": {"recbole_llm.run.cli"}}
    assert _wrong_imports(graph) == {"recbole_llm.core.config": ["recbole_llm.laser.model"],
                                     "recbole_llm.laser.model": ["recbole_llm.seralm.model"]}


def _unexplained_function_imports(path):
    """(line, statement) of each import inside a function of the file at ``path`` with no reason next to it: a
    comment on its own line(s) or on the line just above (a comment above the first of consecutive imports covers
    them all). A bare ``noqa`` or ``type:`` comment is no reason."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}

    def reason_on(lineno):
        return bool(comments.get(lineno)) and not comments[lineno].startswith(("noqa", "type:"))

    found, seen = [], set()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            for field in ("body", "orelse", "finalbody"):
                statements = getattr(node, field, None)
                if not isinstance(statements, list):
                    continue
                covered = False  # the previous statement is an import that has its reason
                for statement in statements:
                    if not isinstance(statement, (ast.Import, ast.ImportFrom)):
                        covered = False
                        continue
                    above = statement.lineno - 1
                    covered = (covered or any(reason_on(n) for n in range(statement.lineno, statement.end_lineno + 1))
                               or (above >= 1 and lines[above - 1].strip().startswith("#") and reason_on(above)))
                    if not covered and id(statement) not in seen:
                        seen.add(id(statement))
                        found.append((statement.lineno, lines[statement.lineno - 1].strip()))
    return found


def test_imports_inside_functions_say_why():
    """An import inside a function (a late import) needs its reason in a comment: an optional or heavy dependency
    (ray, peft, transformers...), the package's registration... Any other import goes at the top of the module."""
    unexplained = {os.path.relpath(path, REPO): found for path in _modules().values()
                   if (found := _unexplained_function_imports(path))}
    assert unexplained == {}


def test_the_late_import_check_reads_comments(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "def f():\n"
        "    import json\n"  # no reason
        "    import re  # noqa: F401\n"  # no reason either
        "    # heavy: a reason above covers the imports that follow it directly\n"
        "    import ray\n"
        "    from ray import tune\n"
        "\n"
        "    x = 1\n"
        "    import glob\n"  # after other code: needs its own
        "    import csv  # optional: a reason on the line\n"
        "    return x\n")
    assert _unexplained_function_imports(str(source)) == [(2, "import json"), (3, "import re  # noqa: F401"),
                                                          (9, "import glob")]
