"""The import graph of the `stt` package has no cycle: every module under stt/, its module-level and
function-level imports (relative ones resolved, `from stt.x import y` counted as importing the submodule
stt.x.y when y is one), imports under `if TYPE_CHECKING:` left out. A cycle is printed, module by module."""

import ast
from pathlib import Path

STT = Path(__file__).resolve().parents[1] / "stt"


def module_names(root: Path = STT) -> dict[str, Path]:
    """{dotted module name: file} of every module under `root` (a package's __init__.py is the package)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` test is TYPE_CHECKING (bare or typing.TYPE_CHECKING)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names `module` imports anywhere (functions included, TYPE_CHECKING blocks not), relative
    imports resolved; for `from a import b` both a and a.b (the caller keeps the ones that are modules)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.extend(f"{base}.{alias.name}" for alias in node.names)
            found.append(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = STT) -> dict[str, set[str]]:
    """{module: the stt modules it imports}. A name that is not a module counts as its nearest module parent
    (`from stt.x import y` with y a function: stt.x); `from a import b` with b a submodule counts as a.b only."""
    modules = module_names(root)
    graph = {}
    for module, path in modules.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        edges = set()
        for name in names:
            if name in modules:
                edges.add(name)
        for name in names:  # `from a import f`: a, unless every name taken from it is a submodule
            parent = name.rpartition(".")[0]
            if name not in modules and parent in modules:
                edges.add(parent)
        graph[module] = edges - {module}
    return graph


def find_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each module of one reaches every other."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (its modules, the first repeated at the end) per strongly connected component, shortest first."""
    return sorted((cycle_in(graph, component) for component in find_components(graph)), key=len)


def describe(graph: dict[str, set[str]], components: list[set[str]]) -> str:
    """Each component as one of its cycles and all its modules."""
    return "import cycles:\n" + "\n".join(
        f"{' -> '.join(cycle_in(graph, c))}   (modules of this cycle's component: {', '.join(sorted(c))})"
        for c in components
    )


def cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), as a list of modules."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for other in sorted(graph[path[-1]] & component):
            if other == start:
                return [*path, start]
            if other not in seen:
                seen.add(other)
                paths.append([*path, other])
    raise AssertionError(f"no cycle through {start}")


def test_the_import_graph_is_read_as_python_resolves_it():
    graph = import_graph()
    assert "stt.propagation.rule" in graph["stt.propagation.dense"]  # module level
    assert "stt.propagation" in graph["stt.evaluate"]  # `from stt.propagation import f`: the package
    assert "stt.recipes" not in graph["stt.stages.base"]  # only under TYPE_CHECKING
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    graph = import_graph()
    components = find_components(graph)
    assert not components, describe(graph, components)


def test_no_import_cycle_through_propagation_or_the_sweep():
    """The part of the graph whose cycles were removed stays free of them (a guard while others remain)."""
    graph, ours = import_graph(), ("stt.propagation", "stt.sweep")
    components = [c for c in find_components(graph) if any(m.startswith(ours) for m in c)]
    assert not components, describe(graph, components)


def test_propagation_imports_no_ray():
    """The propagation package (and every stt module it reaches) imports no Ray: the sweep reads Tune's domains."""
    graph, modules = import_graph(), module_names()
    reached, todo = set(), [m for m in graph if m.startswith("stt.propagation")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    for module in sorted(reached):
        path = modules[module]
        names = imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")
        assert not [n for n in names if n == "ray" or n.startswith("ray.")], module
