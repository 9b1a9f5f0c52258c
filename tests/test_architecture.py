"""The package's import structure (docs/architecture.md): no cycles, layers import downward only, and
the feature store and `import saelab` leave torch out."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).parents[1]

LAYERS = [
    # bottom: no torch, so the store and the app's browsing pages start fast
    [
        "saelab",
        "saelab.errors",
        "saelab.files",
        "saelab.config",
        "saelab.results",
        "saelab.store",
        "saelab.store.*",
        "saelab.app",
    ],
    [
        "saelab.ops",
        "saelab.collectives",
        "saelab.kernels",
        "saelab.kernels.*",
        "saelab.sparsifiers",
        "saelab.losses",
        "saelab.formats",
    ],
    ["saelab.sae"],
    [
        "saelab.models",
        "saelab.corpus",
        "saelab.activations",
        "saelab.rundir",
        "saelab.nexttoken",
        "saelab.export",
        "saelab.sharding",
        "saelab.distributed",
    ],
    [
        "saelab.evals",
        "saelab.trainer",
        "saelab.analysis*",
        "saelab.steering",
        "saelab.diffing",
        "saelab.finetune",
        "saelab.prompt",
    ],
    ["saelab.cli", "saelab.__main__", "saelab.app.*"],
]

APP_READS = ("saelab.app", "saelab.store", "saelab.errors", "saelab.config")
"""What the app's browsing pages may import from saelab: the store and the foundations, never torch."""

APP_LIVE = {
    "saelab.app.live": ("saelab.prompt", "saelab.rundir", "saelab.steering", "saelab.corpus", "saelab.results"),
    "saelab.app.views.inspect": (),
    "saelab.app.views.feature": (),
    "saelab.app.views.steer": ("saelab.steering",),
}
"""The app's modules that run the model, and what else they may import (pages reach it through `live`;
the dashboard only once a prompt is typed into it)."""


def modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (`kernels/` is `saelab.kernels`, `app/` `saelab.app`)."""
    found = {}
    for base, prefix in (
        (ROOT / "saelab", "saelab"),
        (ROOT / "kernels", "saelab.kernels"),
        (ROOT / "app", "saelab.app"),
    ):
        for path in base.rglob("*.py"):
            parts = [prefix, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Import statements that run: everything but the bodies of `if TYPE_CHECKING:` blocks."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: `from .x import y` inside package p is p.x
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_walker_sees_every_kind_of_import() -> None:
    g = graph()
    assert "saelab.kernels.fused" in g["saelab.sae"]  # inside a method
    assert "saelab.ops" in g["saelab.kernels.fused"]  # `from saelab import ops`
    assert "saelab.store" in g["saelab.diffing"] and "saelab.store.reads" in g["saelab.store.writes"]


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(g):
        if name not in state:
            visit(name, [name])


def test_layers_import_only_their_own_layer_or_below() -> None:
    def layer(name: str) -> int:
        hits = [i for i, patterns in enumerate(LAYERS) if any(fnmatch(name, p) for p in patterns)]
        assert len(hits) == 1, f"{name} belongs to {len(hits)} layers; list it once in LAYERS (docs/architecture.md)"
        return hits[0]

    upward = [(a, b) for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not upward, f"imports from a higher layer: {upward}"


def test_app_pages_hold_no_sql_and_read_only_the_store() -> None:
    g = graph()
    for name, path in modules().items():
        if not name.startswith("saelab.app"):
            continue
        allowed = APP_READS + APP_LIVE.get(name, ())
        outside = sorted(t for t in g[name] if not any(t == a or t.startswith(a + ".") for a in allowed))
        assert not outside, f"{name} imports {outside}; browsing pages read saelab.store only"
        if name not in APP_LIVE:
            assert "saelab.app.live" not in g[name], f"{name} is a browsing page: it must not load the model"
        source = path.read_text()
        third = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
                 for n in _runtime_nodes(ast.parse(source))}  # fmt: skip
        assert "torch" not in third and "duckdb" not in third, f"{name} imports torch or duckdb"
        assert not re.search(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE)\s", source), f"{name} holds SQL"


def test_page_scripts_show_no_stray_strings() -> None:
    # Streamlit's magic writes every bare expression of a page script on the page: a string after the
    # module docstring (say, one documenting a constant) would appear as text.
    for name, path in modules().items():
        if name.startswith("saelab.app.views."):
            body = ast.parse(path.read_text()).body
            stray = [n.lineno for n in body[1:] if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)]
            assert not stray, f"{path}: bare strings on lines {stray} would be shown on the page"


def test_store_and_package_import_without_torch(tmp_path) -> None:
    probe = f"""
import sys
import saelab
import saelab.config, saelab.errors, saelab.files, saelab.results
from saelab.store import FeatureStore
import saelab.app.render, saelab.app.common
with FeatureStore.writer({str(tmp_path / "s.duckdb")!r}) as w:
    w.put_sae({{"sae_id": "a", "d_sae": 4, "model": "m"}})
with FeatureStore({str(tmp_path / "s.duckdb")!r}) as store:
    assert store.sae("a").d_sae == 4 and store.feature_list("a").total == 0
assert "torch" not in sys.modules, "importing or reading the store imported torch"
saelab.SAE  # a lazy attribute: only now is torch imported
assert "torch" in sys.modules
assert callable(saelab.rundir.RunDir) and saelab.store.FeatureStore is FeatureStore  # submodules, lazily
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
