"""The package's layers point one way: every import (module level or inside a function) goes to
the same or a lower layer, and the top-level units import each other without cycles.

  0 libraries     models, entropy, captions, metrics, flow, rates
  1 base          sharding, multihost, flops, convert, pretrained, text, data, build, runs
  2 codec         codec
  3 training      train
  4 applications  evaluation, planning (the planner compiles the training step)
  5 command line  cli, jobs and the job entry points
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "percov2_jax"

LAYERS = {
    **dict.fromkeys(["models", "entropy", "captions", "metrics", "flow", "rates", "storage", "compilation_cache"], 0),
    **dict.fromkeys(["sharding", "multihost", "flops", "convert", "pretrained", "text", "data", "build", "runs"], 1),
    "codec": 2,
    "train": 3,
    **dict.fromkeys(["evaluation", "planning"], 4),
    **dict.fromkeys(["cli", "jobs", "train.__main__", "train_prior", "evaluate", "plan"], 5),
}


def unit_of(module: str) -> str:
    """``percov2_jax.codec.api`` -> ``codec``; entry points (``train.__main__``) are units of their own."""
    parts = module.split(".")[1:]
    if parts[-2:] == ["train", "__main__"]:
        return "train.__main__"
    return parts[0] if parts else ""


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> set[str]:
    """Every ``percov2_jax`` module ``path`` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("percov2_jax")}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package uses absolute imports)"
            if node.module and node.module.startswith("percov2_jax"):
                # ``from percov2_jax import build`` imports the module percov2_jax.build.
                found |= {
                    f"{node.module}.{a.name}" if node.module == "percov2_jax" else node.module for a in node.names
                }
    return found


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit_of(module_name(path))
        if not source:
            continue
        graph.setdefault(source, set())
        graph[source] |= {unit_of(m) for m in imports(path)} - {source, ""}
    return graph


def test_every_unit_has_a_layer():
    unknown = sorted(set(unit_graph()) - set(LAYERS))
    assert not unknown, f"add these to LAYERS (and to the layer table in docs/index.md): {unknown}"


def test_no_lower_layer_imports_a_higher_one():
    upward = sorted(
        f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
        for a, targets in unit_graph().items()
        for b in targets
        if LAYERS.get(b, 0) > LAYERS.get(a, 0)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_units():
    graph = unit_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("bad", [("codec", "train"), ("models", "sharding"), ("runs", "codec")])
def test_the_check_sees_an_upward_import(bad, tmp_path, monkeypatch):
    """A planted upward import is reported (the check can fail)."""
    low, high = bad
    graph = unit_graph()
    graph[low] = graph[low] | {high}
    monkeypatch.setattr(__import__(__name__), "unit_graph", lambda: graph)
    with pytest.raises(AssertionError, match=f"{low} .* imports {high}"):
        test_no_lower_layer_imports_a_higher_one()


def test_private_names_stay_inside_their_unit():
    """No module imports another unit's ``_private`` name."""
    crossing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit_of(module_name(path))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("percov2_jax"):
                for alias in node.names:
                    if alias.name.startswith("_") and unit_of(node.module) != source:
                        crossing.append(f"{module_name(path)}: from {node.module} import {alias.name}")
    assert not crossing, crossing
