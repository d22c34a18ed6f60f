"""Imports point one way: flows -> cluster -> render -> schemas. Checked on the source, every
import statement (function-level and TYPE_CHECKING ones too), so a lazy import cannot hide."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "reelfarm"
# layer -> the reelfarm subpackages it must never import
FORBIDDEN = {
    "schemas": ("reelfarm.render", "reelfarm.cluster", "reelfarm.flows"),
    "render": ("reelfarm.cluster", "reelfarm.flows"),
    "cluster": ("reelfarm.flows",),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in imports_of(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_guard_sees_lazy_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from reelfarm.cluster.store import ChunkStore\n")
    assert imports_of(mod) == [(2, "reelfarm.cluster.store")]
