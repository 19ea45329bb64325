"""The house runs one way: no import cycles among fastcount's modules (docs/architecture.md)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastcount"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _is_extension(package: str, name: str) -> bool:
    """A compiled submodule (``fastcount._C``): not Python source, so not part of the graph."""
    folder = PKG.parent.joinpath(*package.split("."))
    return any(folder.glob(f"{name}.*.so")) or any(folder.glob(f"{name}.so")) or any(folder.glob(f"{name}*.pyd"))


def _targets(mod: str, is_pkg: bool, node, mods) -> set[str]:
    """The fastcount modules an import statement loads (``from pkg import sub`` loads pkg.sub)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - node.level + 1] if node.level else []
        prefix = ".".join(base + ([node.module] if node.module else []))
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods or _is_extension(prefix, a.name) else prefix
                 for a in node.names]
    return {n for n in names if n in mods and n != mod}


def _top_level_imports(tree):
    """Import statements that run when the module is imported (module body, try/if blocks)."""
    stack = list(tree.body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            yield n
        elif isinstance(n, (ast.Try, ast.If)):
            stack += n.body + n.orelse + getattr(n, "finalbody", [])
            stack += [x for h in getattr(n, "handlers", []) for x in h.body]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for m, (p, is_pkg) in mods.items():
        tree = ast.parse(p.read_text())
        graph[m] = set().union(*(_targets(m, is_pkg, n, mods) for n in _top_level_imports(tree)))
    return graph


def find_cycle(graph) -> list[str] | None:
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = "done"
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_among_fastcount_modules():
    graph = import_graph()
    assert len(graph) > 30 and "fastcount.slide.engine" in graph["fastcount.slide"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_no_fastcount_import_hidden_in_a_function():
    """Imports inside functions are for optional heavy dependencies only (triton kernels, dask)."""
    allowed = {("fastcount.inference.triton", "kernels"), ("fastcount", "distributed"), ("fastcount.cli", "distributed")}
    hidden = []
    for m, (p, is_pkg) in _modules().items():
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("fastcount")):
                        if (m, (n.module or "").split(".")[-1]) not in allowed:
                            hidden.append(f"{m}.{fn.name}: from {'.' * n.level}{n.module or ''}")
    assert not hidden, hidden
