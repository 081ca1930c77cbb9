"""The direction of imports, checked: core -> quant -> export -> simulation -> app.

Layers (a module may import only its own layer and those below, lazy imports inside
functions included):
    0  edge core (edge.layers, edge.nets, edge.rules, edge.step, edge.data, ...) and targets
    1  quant
    2  export
    3  edge.sim (the memory simulator)
    4  edge.app (training loop, CLI and its commands; and `python -m edge`)
and no package has a cycle of module-level imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge", "quant", "export", "targets")


def layer(module: str) -> int:
    if module.startswith("edge.app") or module == "edge.__main__":  # `python -m edge` too
        return 4
    if module.startswith("edge.sim"):
        return 3
    if module.startswith("export"):
        return 2
    if module.startswith("quant"):
        return 1
    return 0


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(module, line) of every import of our packages; `from pkg import sub` counts as an
    import of the submodule pkg.sub when there is one."""
    known = MODULES
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # TYPE_CHECKING blocks import nothing
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names
                    if f"{node.module}.{a.name}" in known]
            found += [(m, node.lineno) for m in subs] or [(node.module, node.lineno)]
    return [(m, line) for m, line in found if m.split(".")[0] in PACKAGES]


MODULES = modules()


def test_imports_point_down_only() -> None:
    bad = []
    for name, path in modules().items():
        for target, line in imports(path):
            if layer(target) > layer(name):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({name}, layer {layer(name)}) "
                           f"imports {target} (layer {layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_package_has_an_import_cycle() -> None:
    mods = modules()
    graph = {n: {t for t, _ in imports(p, top_level_only=True) if t in mods and t != n}
             for n, p in mods.items()}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m] if m in stack else [n, m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_the_layer_check_can_fail(tmp_path) -> None:
    bad = tmp_path / "mod.py"
    bad.write_text("def f():\n    from edge.app.train import train\n")
    assert layer("edge.rules.x") < layer(imports(bad)[0][0])
