"""The package's shape, checked: layers import downward only, no cycles, no reaching into a
package's __init__ or another module's private names, and a light `import featureshift`.

Layers, top to bottom:
    cli               parses flags, prints (cli, cli_options, cli_render)
    commands          train, vis, timeline, atlas, merge, compare, compare_runs, report, export, demo
    engines           optvis (rendering), metrics, jobs (tile cache, executors), training, report (site writer)
    foundations       models, network, snapshot, states, run, data, io, errors, device, selection, grid, version
A module may import from its own layer (without cycles) and from the layers below it.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "featureshift"
LAYERS = {"cli": 3, "cli_options": 3, "cli_render": 3, "__main__": 3, "commands": 2, "optvis": 1, "metrics": 1, "jobs": 1, "training": 1, "report": 1}
FOUNDATION = 0


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], FOUNDATION) if len(parts) > 1 else 99


def resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if module not in PACKAGES:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import, lazy ones included."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return found


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports(m):
            if target in MODULES and target != m:
                edges[m].add(target)
    return edges


def test_layers_import_only_downward():
    wrong = []
    for m in MODULES:
        if m == "featureshift":
            continue
        for target, _, line in imports(m):
            if target.startswith("featureshift") and target in MODULES and layer_of(target) > layer_of(m):
                wrong.append(f"{m}:{line} imports {target}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges = internal_edges()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_nothing_is_imported_from_a_package_init():
    """`from . import __version__` and re-exports through __init__ hide where things live."""
    wrong = []
    for m in MODULES:
        for target, name, line in imports(m):
            if target.startswith("featureshift") and target in PACKAGES and name is not None:
                wrong.append(f"{m}:{line} imports {name} from package {target}")
            if target == "featureshift" and m != "featureshift":
                wrong.append(f"{m}:{line} imports the top-level package")
    assert not wrong, "\n".join(wrong)


def test_package_inits_are_documentation_only():
    wrong = []
    for pkg in PACKAGES - {"featureshift"}:
        tree = ast.parse(MODULES[pkg].read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        if body:
            wrong.append(pkg)
    assert not wrong, f"package __init__ files with code (import from the defining module instead): {wrong}"


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for m in MODULES:
        for target, name, line in imports(m):
            if target.startswith("featureshift") and name and name.startswith("_") and not name.startswith("__"):
                wrong.append(f"{m}:{line} imports {target}.{name}")
    assert not wrong, "\n".join(wrong)


def test_every_public_api_name_resolves_to_its_module():
    import featureshift

    for name in featureshift.__all__:
        assert getattr(featureshift, name) is not None, name


def _fresh_python(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_importing_the_package_loads_nothing_heavy_and_changes_nothing():
    seen = _fresh_python(
        "import json, os, sys; before = dict(os.environ); import featureshift, featureshift.cli; "
        "print(json.dumps({'heavy': sorted(m for m in ('torch', 'torchvision', 'numpy', 'PIL') if m in sys.modules),"
        " 'env_changed': dict(os.environ) != before}))")
    assert seen == {"heavy": [], "env_changed": False}


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["vis", "--help"], ["train", "--help"],
                                  ["vis", "squeezenet1_1", "x", "-o", "a.png", "--device", "tpu"]])
def test_help_version_and_argument_errors_do_not_load_torch(argv):
    """The command line answers --help, --version and bad arguments without loading torch
    (which takes seconds): it imports heavy libraries only where work starts."""
    script = "\n".join([
        "import contextlib, io, json, sys",
        "from featureshift.cli import main",
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):",
        "    try:",
        f"        main({argv!r})",
        "    except SystemExit:",
        "        pass",
        "print(json.dumps({'torch': 'torch' in sys.modules}))",
    ])
    assert _fresh_python(script) == {"torch": False}
