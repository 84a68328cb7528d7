"""The package's structure: no import cycles, every registered op kind dispatched."""

import ast
from pathlib import Path

import numpy as np
import pytest

import limitkernel as lk
from limitkernel import _fused, spec
from limitkernel.layers import blocks

PACKAGE = Path(lk.__file__).resolve().parent


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """Every package module that ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(
                    ".py").exists() or (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                    else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("limitkernel"))
    return {m for m in found if m != name}


def test_imports_have_no_cycles():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _op_kinds():
    kinds = {cls for cls in spec.REGISTRY.values() if getattr(cls, "code", None) is not None}
    return kinds | {blocks.SAVE, blocks.LOAD, blocks.ADD}


def test_every_opcode_belongs_to_one_kind_and_is_dispatched():
    owners = {}
    for kind in _op_kinds():
        cls = kind if isinstance(kind, type) else None
        owner = next(c for c in cls.__mro__ if "code" in vars(c)) if cls else kind
        owners.setdefault(kind.code, set()).add(owner)
    for code, found in owners.items():
        assert len(found) == 1, f"opcode {code} is claimed by {found}"
    assert set(owners) == set(_fused.DISPATCHED)


# A small network for every registered layer name that needs more than
# "dense, NAME, dense" to be valid.
_NETWORKS = {
    "dense": "dense",
    "residual": "dense, residual[relu, dense], dense",
    "parallel": "dense, parallel[relu, dense; erf, dense], dense",
    "concat": "dense, concat[relu, dense; erf, dense], dense",
    "dropout": "dense, dropout(p=0.2), dense",
    "gaussian": "dense(w_std=0.5), gaussian, dense",
}
# Layers of images and sequences, on (5, 4, 4, 2) images.
_IMAGE_NETWORKS = {
    "conv": "conv, relu, flatten, dense",
    "avg_pool": "conv, avg_pool, relu, global_avg_pool, dense",
    "global_avg_pool": "conv, relu, global_avg_pool, dense",
    "flatten": "conv, flatten, dense",
}


@pytest.mark.parametrize("name", sorted(spec.REGISTRY))
def test_every_registered_layer_runs_through_the_fused_pass(name):
    rng = np.random.default_rng(0)
    if name in _IMAGE_NETWORKS:
        text, x = _IMAGE_NETWORKS[name], rng.standard_normal((5, 4, 4, 2))
    else:
        text, x = _NETWORKS.get(name, f"dense, {name}, dense"), rng.standard_normal((5, 3))
    out = lk.kernel(text, x, x[:3] + 0.1)
    assert all(np.all(np.isfinite(v)) for v in out.values())
