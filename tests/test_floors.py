"""The floor plan of docs/ARCHITECTURE.md, enforced: a module imports only its own floor or floors below,
and modules on one floor import each other without circles. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cxrdist"

FLOORS = {  # module prefix -> floor (the longest matching prefix wins)
    "cxrdist.cli": 7,
    "cxrdist.launch": 6,
    "cxrdist.evaluate": 6,
    "cxrdist.export": 6,
    "cxrdist.bench": 6,
    "cxrdist.gpucheck": 6,
    "cxrdist.engine": 5,
    "cxrdist.data": 4,
    "cxrdist.demo": 4,
    "cxrdist.shards": 3,
    "cxrdist.report": 3,
    "cxrdist.matrix": 3,
    "cxrdist.seeds": 3,
    "cxrdist.published": 2,
    "cxrdist.sources": 2,
    "cxrdist.synth": 2,
    "cxrdist.models": 2,
    "cxrdist.metrics": 2,
    "cxrdist.telemetry": 2,
    "cxrdist.trackers": 2,
    "cxrdist.runfolder": 2,
    "cxrdist.labels": 1,
    "cxrdist.imaging": 1,
    "cxrdist.config": 1,
    "cxrdist.dist": 1,
    "cxrdist.provenance": 1,
    "cxrdist.redact": 1,
    "cxrdist.cpus": 1,
    "cxrdist.log": 1,
    "cxrdist.atomic": 1,
    "cxrdist.errors": 1,
    "cxrdist.contain": 1,
    "cxrdist": 1,
}


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every cxrdist module this file imports (``from cxrdist import dist`` -> cxrdist.dist)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cxrdist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxrdist") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(
                    sub
                    if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file()
                    or (PKG.parent / sub.replace(".", "/")).is_dir()
                    else node.module
                )
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in PKG.rglob("*.py")}


def test_every_module_has_a_floor():
    assert all(floor(m) for m in graph())


def test_no_module_imports_a_floor_above_its_own():
    bad = [
        f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
        for m, deps in graph().items()
        for d in deps
        if floor(d) > floor(m)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_circles_within_a_floor():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d == "cxrdist" or d not in g:
                continue  # the package itself only sets up the OpenMP policy
            if state.get(d) == 1:
                return path + [m, d]
            if not state.get(d):
                found = visit(d, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(g):
        if not state.get(m):
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle)
