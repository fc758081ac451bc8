"""The package layout: no import cycles among the project's own modules, and the command modules
stay thin (the work lives in the rooms below them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("probes", "hooks", "cache", "analyses")
COMMANDS_MAX_LINES = 3000


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports, at module level or inside a function.

    `from a.b import c` counts as importing `a.b.c` when that is a module, and `a.b` itself; a name
    that is not a module counts as its nearest enclosing module. An import of one of the module's
    own enclosing packages is left out (the package's __init__ re-exports its rooms: that is the
    face, not a cycle)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                targets += [f"{base}.{alias.name}" for alias in node.names] + [base]
        resolved = {resolve(t) for t in targets} - {None, module}
        graph[module] = {t for t in resolved if t is not None
                         and not (modules[t].name == "__init__.py" and module.startswith(t + "."))}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, each sorted, in order."""

    def reach(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    components = {tuple(sorted(w for w in reachable[m] if m in reachable[w])) for m in graph}
    return sorted(list(c) for c in components if len(c) > 1)


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e", "d"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg.a import x\n")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from . import b\nx = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("from .a import x\nimport pkg\n")
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
               "pkg.b": tmp_path / "pkg" / "b.py"}
    graph = import_graph(modules)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycles():
    found = cycles(import_graph(_modules()))
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_command_modules_are_thin():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in sorted((ROOT / "probes" / "commands").rglob("*.py"))}
    largest = ", ".join(f"{name} {n}" for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
    assert sum(sizes.values()) <= COMMANDS_MAX_LINES, (
        f"probes/commands holds {sum(sizes.values())} lines (at most {COMMANDS_MAX_LINES}); "
        f"largest: {largest}")
