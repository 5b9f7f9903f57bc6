"""The house plan holds: sources and sinks (``formats/``) never import the tool, kernels never import commands,
and no module imports itself back through others (module-level imports, read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """Each module of ``convert`` and ``formats`` -> the project modules it imports at module level."""
    modules = {module_name(p): p for top in ("convert", "formats") for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_formats_never_import_the_tool_and_kernels_never_import_commands() -> None:
    graph = module_imports()
    assert len(graph) > 30  # the walk found the package
    for name, imports in graph.items():
        if name.startswith("formats"):
            assert not {m for m in imports if m.startswith("convert")}, name
        if name.startswith("convert.kernels"):
            assert not {m for m in imports if m.startswith(("convert.commands", "convert.plan", "convert.cli"))}, name


def test_no_import_cycles() -> None:
    graph = module_imports()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
