"""The house rules of the layout, read from the code: every import (function-level ones included)
goes down the order docs/DESIGN.md gives, so there is no circle; ``models`` imports nothing of the
pipeline; no module is over 600 lines."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import modules of its own rank only inside its package (data/*)
ORDER = [
    ["pipeline.errors", "pipeline.redact", "pipeline.retry", "pipeline.cluster", "pipeline.elastic"],
    ["pipeline.placement"],
    ["models"],
    ["pipeline.data", "pipeline.activations", "pipeline.roofline"],
    ["pipeline.config", "pipeline.console", "pipeline.tracking", "pipeline.capacity"],
    ["pipeline.weights", "pipeline.checkpoint", "pipeline.spec"],
    ["pipeline.engine", "pipeline.evaluate", "pipeline.registry"],
    ["pipeline.evaluate_ray"],
    ["pipeline.train", "pipeline.promote", "pipeline.predict"],
    ["pipeline.launch"],
    ["pipeline.finetune"],
    ["pipeline.workflow"],
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "models").rglob("*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in it, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in ("pipeline", "models") and name != "pipeline":
                found.add(name)
    return found


def rank(module: str) -> tuple[int, str]:
    for i, group in enumerate(ORDER):
        for top in group:
            if module == top or module.startswith(top + "."):
                return i, top
    raise AssertionError(f"{module} has no place in ORDER (add it, and to docs/DESIGN.md's import order)")


def test_imports_go_down_the_declared_order_and_make_no_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    upward = []
    for name, targets in graph.items():
        for target in targets:
            (r, top), (rt, target_top) = rank(name), rank(target)
            if rt > r or (rt == r and top != target_top):
                upward.append(f"{name} -> {target}")
    assert not upward, upward

    state: dict[str, int] = {}          # 1 visiting, 2 done: depth-first search for a back edge

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, " -> ".join([*path, name, target])
            if target not in state:
                visit(target, [*path, name])
        state[name] = 2
    for name in graph:
        if name not in state:
            visit(name, [])


def test_every_module_holds_at_most_600_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 600}
    assert not long, long


def test_the_order_is_the_one_docs_design_states():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    stated = " -> ".join("/".join(m.removeprefix("pipeline.") for m in group) for group in ORDER)
    assert stated in design, stated
