"""docs/design.md's layer rules: arrows point down only. Checked on the import statements."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "zerofx"

# module prefix -> zerofx modules it may import (prefix match). tools/ may import anything.
ALLOWED = {
    "zerofx.config": ["zerofx.config"],
    # the alpha-beta cost model: numbers only, read by the runtime (which fits it) and the
    # passes' dumps (which predict with it)
    "zerofx.comm_cost": [],
    "zerofx.tp.layout": ["zerofx.config", "zerofx.tp.discovery", "zerofx.tp.rules"],  # split how
    # the layout's analysis of a traced graph, and the sharding algebra it shares with the
    # tensor_parallel pass
    "zerofx.tp.discovery": ["zerofx.tp.propagation", "zerofx.tp.rules", "zerofx.config",
                            "zerofx.fx_source"],
    # the seam: the ops passes put into graphs and the runtime carries out (both import it)
    "zerofx.graph_ops": [],
    "zerofx.fx_source": [],  # a node's line of user code: read by passes and tp_discovery
    "zerofx.cpu_gemm": [],  # the host's CPU matmul forms: read by the runtime and a pass
    "zerofx.dynamo_settings": [],  # how Dynamo traces model code: read by backend and engine
    # propagation_cuts holds its rules for ops that cut (registered when propagation loads)
    "zerofx.tp.propagation": ["zerofx.tp.rules", "zerofx.tp.propagation"],
    "zerofx.tp.rules": [],
    "zerofx.plan": ["zerofx.plan", "zerofx.tp.layout", "zerofx.config"],
    "zerofx.csrc": [],
    # how ranks talk: below the rest of the runtime, which hands it groups and buffers
    "zerofx.runtime.comm": ["zerofx.runtime.comm", "zerofx.plan", "zerofx.config",
                            "zerofx.comm_cost"],
    # docs/design.md: "the runtime allocates from [the plan]", so runtime may read it.
    "zerofx.runtime": ["zerofx.runtime", "zerofx.graph_ops", "zerofx.plan", "zerofx.tp.layout",
                       "zerofx.config", "zerofx.comm_cost", "zerofx.cpu_gemm",
                       "zerofx.lr_schedules"],
    "zerofx.passes": ["zerofx.passes", "zerofx.graph_ops", "zerofx.plan", "zerofx.tp.layout",
                      "zerofx.tp.propagation", "zerofx.tp.rules", "zerofx.config",
                      "zerofx.comm_cost", "zerofx.fx_source", "zerofx.cpu_gemm"],
    "zerofx.backend": ["zerofx.passes", "zerofx.runtime", "zerofx.plan", "zerofx.tp.layout",
                       "zerofx.config", "zerofx.step_graph", "zerofx.cpu_gemm",
                       "zerofx.dynamo_settings"],
    "zerofx.step_graph": ["zerofx.passes", "zerofx.runtime", "zerofx.plan", "zerofx.tp.layout",
                          "zerofx.config"],
    "zerofx.lr_schedules": ["zerofx.config"],
    "zerofx.data": ["zerofx.config"],  # its errors are ConfigErrors
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def _zerofx_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zerofx"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("zerofx"))
    return found


def _layer(module: str) -> str | None:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True)
                 if module == p or module.startswith(p + ".") or module.startswith(p + "_")),
                None)


MODULES = sorted(p for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path):
    module = _module_name(path)
    layer = _layer(module)
    if layer is None:
        return  # the user-API layer (engine, checkpoint, ...) may import everything below
    for imported in _zerofx_imports(path):
        ok = any(imported == a or imported.startswith(a + ".") or imported.startswith(a + "_")
                 for a in ALLOWED[layer])
        assert ok, f"{module} (layer {layer}) imports {imported}; allowed: {ALLOWED[layer]}"


def test_runtime_never_imports_passes():
    for path in (ROOT / "runtime").rglob("*.py"):
        assert not any(i.startswith("zerofx.passes") for i in _zerofx_imports(path)), path
