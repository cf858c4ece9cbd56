"""The package's import graph, read from the source with ``ast``: no cycle between modules (imports
inside functions count; imports under ``if TYPE_CHECKING:`` do not, they never run), and no module
imports a name starting with ``_`` from another module. Graph and cycle search are written here,
independently of the package."""

import ast
from pathlib import Path

from distributed import REPO

PACKAGE = REPO / "mtpeft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges, private = {m: set() for m in modules}, []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([source] if source else []))
                if not source.startswith("mtpeft"):
                    continue
                for alias in node.names:
                    target = f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    if target in modules and target != name:
                        edges[name].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {alias.name} from {source}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.name != name:
                        edges[name].add(alias.name)
        private += _private_attributes(name, path, modules)
    return edges, private


def _private_attributes(name: str, path: Path, modules: dict) -> list[str]:
    """``module._name`` on a module bound by ``from mtpeft.x import module`` or ``import mtpeft.x as m``."""
    tree = ast.parse(path.read_text())
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mtpeft"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    bound[alias.asname] = alias.name
    return [f"{name} reads {bound[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def _cycles(edges: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_search_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    edges, _ = _graph()
    assert "mtpeft.tasks.formats" in edges["mtpeft.config"]  # imports inside functions are read too
    assert _cycles(edges) == []


def test_no_private_name_imported_across_modules():
    _, private = _graph()
    assert private == []


def test_private_attribute_check_finds_a_planted_one(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from mtpeft.trainer import loop\nimport mtpeft.config as c\nloop._x()\nc._y\nloop.public()\n")
    found = _private_attributes("planted", planted, {"mtpeft.trainer.loop": None, "mtpeft.config": None})
    assert sorted(found) == ["planted reads mtpeft.config._y", "planted reads mtpeft.trainer.loop._x"]
