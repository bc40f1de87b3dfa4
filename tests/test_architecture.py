"""The package's shape, checked from its source (issue 14; docs/architecture.md describes it).

* Imports run one way: a module imports only modules of its own layer or below (the layer order
  is ``LAYERS``, the same as docs/architecture.md), never the ``patchknn`` facade, and there is no
  import circle except inside the backbone registry (a plugin registry). Imports under
  ``if TYPE_CHECKING:`` are annotations only and are not counted.
* No module reaches into another module's private (underscore) names.
* Every module stays under 500 lines.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "patchknn"

#: Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS: list[tuple[str, ...]] = [
    ("patchknn._version", "patchknn.errors", "patchknn.resources", "patchknn.checksums"),
    ("patchknn.backbones", "patchknn.data", "patchknn.metrics", "patchknn.synthetic", "patchknn.defects",
     "patchknn.reduction", "patchknn.index", "patchknn.coreset", "patchknn.resample", "patchknn.guided"),
    ("patchknn.config", "patchknn.presets", "patchknn.features", "patchknn.execution"),
    ("patchknn.scoring", "patchknn.member_weights", "patchknn.serialization", "patchknn.visualize"),
    ("patchknn.persistence", "patchknn.heldout", "patchknn.calibration_defects", "patchknn.threshold"),
    ("patchknn.bank", "patchknn.kinds", "patchknn.model", "patchknn.runtime"),
    ("patchknn.ensemble", "patchknn.versions"),
    ("patchknn.evaluation", "patchknn.report", "patchknn.tune"),
    ("patchknn.server", "patchknn.distributed", "patchknn.export", "patchknn.watch"),
    ("patchknn.options", "patchknn.cli"),
]
#: Import circles allowed inside these packages (plugin registries).
REGISTRIES = ("patchknn.backbones",)
#: The CLI's own subcommand modules sit in the CLI's layer, wherever they live.
CLI_LAYER = len(LAYERS) - 1
MAX_LINES = 500
#: Private names of other libraries used on purpose, each with its reason.
THIRD_PARTY_PRIVATE = {
    # the only way to ask oneDNN whether this CPU has native bfloat16 (AVX512-BF16 / AMX)
    ("torch.ops.mkldnn", "_is_mkldnn_bf16_supported"),
    # torch's int8 x int8 -> int32 matrix product (the exact int8 screen; no public name yet)
    ("torch", "_int_mm"),
    # whether the CPU has AMX tiles (the int8 screen then runs on oneDNN's AMX kernel; no public name)
    ("torch.cpu", "_is_amx_tile_supported"),
    # a tensor's version counter (bumped by in-place changes; no public accessor): when a network's
    # folded copy is stale (patchknn.backbones.folding)
    ("tensor", "_version"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module.endswith(".commands"):
        return CLI_LAYER
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports at run time (``from a import b`` counts ``a.b`` when
    that is a module, else ``a``)."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [module, *subs]
        for t in targets:
            if not t.startswith("patchknn"):
                continue
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t != name and t in MODULES:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "patchknn":
            _layer(name)


def test_imports_run_down_the_layers_and_never_through_the_facade():
    problems = []
    for name, deps in sorted(GRAPH.items()):
        if name == "patchknn":
            continue
        for dep in sorted(deps):
            if dep == "patchknn":
                problems.append(f"{name} imports the patchknn facade (import the owning module)")
            elif _layer(dep) > _layer(name):
                problems.append(f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})")
    assert not problems, "\n".join(problems)


def test_no_import_circles_outside_the_registries():
    def registry(m: str) -> bool:
        return any(m == r or m.startswith(r + ".") for r in REGISTRIES)

    circles = set()
    for start in GRAPH:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for dep in GRAPH.get(node, ()):
                if dep == start and not all(registry(m) for m in path):
                    circles.add(" -> ".join((*path, dep)))
                elif dep not in seen and dep not in path:
                    seen.add(dep)
                    stack.append((dep, (*path, dep)))
    assert not circles, "\n".join(sorted(circles))


def _own_private_names(tree: ast.AST) -> set[str]:
    """Underscore names a module defines: functions, classes, assignments (``_x = ...``,
    ``self._x = ...``)."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    return {n for n in own if n.startswith("_")}


def test_no_module_uses_another_modules_private_names():
    """A module may use the private names it defines itself (its own classes' internals, even
    through another instance of its class) and its instances' inherited ones (``self._x``), never
    those of another module."""
    problems = []
    for name, path in sorted(MODULES.items()):
        tree = ast.parse(path.read_text())
        own = _own_private_names(tree)
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("patchknn"):
                problems += [f"{name} imports {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
            if not (isinstance(node, ast.Attribute) and re.fullmatch(r"_[a-z]\w*", node.attr)):
                continue
            owner = ast.unparse(node.value)
            if node.attr in own or owner in ("self", "cls") or (owner, node.attr) in THIRD_PARTY_PRIVATE:
                continue
            problems.append(f"{name}:{node.lineno} uses .{node.attr} of {ast.unparse(node.value)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small_enough_to_read(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines < MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}): split it by concept"


def test_cli_start_does_not_import_the_heavy_libraries():
    """`patchknn --help` and usage errors answer at once: importing the CLI loads no torch,
    faiss, matplotlib, scipy or Ray (the subcommands import them when they run)."""
    code = (
        "import sys, patchknn.cli\n"
        "heavy = [m for m in ('torch', 'faiss', 'matplotlib', 'scipy', 'ray', 'fastapi') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing patchknn.cli loads {out.stdout.strip()}"
