"""The package's shape, checked: layers import downward only, no cycles, no reaching into a
package's __init__ or another module's private names, no imports hidden from these checks,
and a light `import featureshift`.

Layers, top to bottom:
    benchmarks        measure the package from outside (benchmarks/*.py)
    cli               parses flags, prints (cli, cli_options, cli_render)
    commands          train, vis, timeline, atlas, merge, compare, compare_runs, report, export, demo
    engines           optvis (rendering), metrics, jobs (tile cache, executors), training, report (site writer)
    foundations       models, network, snapshot, states, run, data, io, errors, device, selection, grid, version,
                      flags
A module may import from its own layer (without cycles) and from the layers below it.

Inside the engine and the foundation layer the groups (a package such as jobs/, or a module
such as run.py) are in an order, and a group imports only the groups before it:
    engines           optvis < metrics < jobs < training < report
    foundations       errors < version < flags < io < selection < grid < device < data < models < snapshot
                      < run < states < network
The order is what imports what: jobs renders with optvis; the report renders with jobs and
measures with metrics. Snapshots hold a model's description (models), a run folder holds
snapshots, training states live in a run folder, and network opens all of them. Groups that
do not import each other are placed so that the likelier new import points down: device's
rules serve data loading and models, not the other way round.

The only import that does not name its module in an import statement is the lazy public
API in featureshift/__init__.py (so `import featureshift` stays instant); its targets are
checked like imports. A benchmark imports featureshift's modules by name (the public API
`featureshift.X`, commands, engines, and what it measures directly, such as the data
loader), names only what those modules define, and nothing private.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "featureshift"
BENCHMARKS = ROOT / "benchmarks"
LAYERS = {"cli": 3, "cli_options": 3, "cli_render": 3, "__main__": 3, "commands": 2,
          "optvis": 1, "metrics": 1, "jobs": 1, "training": 1, "report": 1}
FOUNDATION = 0
ENGINE_ORDER = ["optvis", "metrics", "jobs", "training", "report"]
FOUNDATION_ORDER = ["errors", "version", "flags", "io", "selection", "grid", "device", "data", "models", "snapshot",
                    "run", "states", "network"]
LAZY_API = "featureshift"  # the one module allowed to import by name at run time
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


@dataclasses.dataclass(frozen=True)
class Import:
    module: str  # the featureshift (or other) module imported from
    name: str | None  # the name taken from it; None when the module itself is imported
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
# folders without an __init__.py (commands/): `featureshift.commands.vis` still names a module
NAMESPACES = {m.rsplit(".", i)[0] for m in MODULES for i in range(1, m.count(".") + 1)} - set(MODULES)
BENCHMARK_FILES = sorted(BENCHMARKS.glob("*.py"))


@functools.lru_cache(maxsize=None)
def tree_of(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], FOUNDATION) if len(parts) > 1 else 99


def group_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if module not in PACKAGES:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def lazy_exports(tree: ast.Module) -> dict[str, tuple[str, int]]:
    """The lazy public API's table (public name -> module it loads from) with its line."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return {name: (target, node.lineno) for name, target in ast.literal_eval(node.value).items()}
    return {}


def imports_in(module: str, tree: ast.Module) -> list[Import]:
    """Every import statement of MODULE (those inside functions too) and, for the lazy public API,
    the modules its names load from."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append(Import(sub, None, node.lineno) if sub in MODULES else Import(target, a.name, node.lineno))
    if module == LAZY_API:
        found += [Import(f"{module}.{target}", name, line) for name, (target, line) in lazy_exports(tree).items()]
    return found


@functools.lru_cache(maxsize=None)  # several checks read every module's imports: walk each tree once
def imports(module: str) -> tuple[Import, ...]:
    return tuple(imports_in(module, tree_of(module)))


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for imp in imports(m):
            if imp.module in MODULES and imp.module != m:
                edges[m].add(imp.module)
    return edges


def defined_names(module: str) -> set[str]:
    """What `from MODULE import NAME` can take: its top-level definitions, imports and submodules."""
    names = {m[len(module) + 1:] for m in MODULES if m.startswith(f"{module}.") and "." not in m[len(module) + 1:]}
    pending = list(tree_of(module).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "finalbody", [])
            pending += [s for h in getattr(node, "handlers", []) for s in h.body]
    if module == LAZY_API:
        names |= set(lazy_exports(tree_of(module)))
    return names


def public_api() -> set[str]:
    return set(lazy_exports(tree_of(LAZY_API))) | {"__version__"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# --- the checks, each a function of a module's source so that a bad case can be shown to fail ---

def dynamic_imports(tree: ast.Module) -> list[int]:
    """Lines that import by a name computed at run time: importlib.import_module(...), __import__(...)."""
    aliases = {"__import__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "importlib":
            aliases |= {a.asname or a.name for a in node.names if a.name in ("import_module", "__import__")}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id in aliases) or (
                    isinstance(f, ast.Attribute) and f.attr in ("import_module", "__import__")):
                lines.append(node.lineno)
    return sorted(lines)


def dotted(node: ast.expr) -> list[str] | None:
    """a.b.c as ['a', 'b', 'c']; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def module_bindings(module: str, tree: ast.Module) -> dict[str, str]:
    """Local name -> the featureshift module it stands for, for every module imported as a module."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "featureshift":
                    # `import featureshift.x.y` binds featureshift; `import featureshift.x.y as m` binds m
                    bound[a.asname or "featureshift"] = a.name if a.asname else "featureshift"
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    bound[a.asname or a.name] = f"{target}.{a.name}"
    return bound


def private_reaches(module: str, tree: ast.Module) -> list[str]:
    """`zoo._x`, where zoo is another featureshift module: its private names are its own."""
    bound = module_bindings(module, tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain = dotted(node.value)
            if chain and chain[0] in bound:
                owner = ".".join([bound[chain[0]]] + chain[1:])
                if owner in MODULES and owner != module:
                    found.append(f"{module}:{node.lineno} reaches {owner}.{node.attr}")
    return found


def band_order_violations(module: str, found: list[Import]) -> list[str]:
    """Imports against the order of the groups inside the engine or the foundation layer."""
    wrong = []
    for band in (ENGINE_ORDER, FOUNDATION_ORDER):
        mine = group_of(module)
        if mine not in band:
            continue
        for imp in found:
            theirs = group_of(imp.module) if imp.module.startswith("featureshift.") else None
            if theirs in band and theirs != mine and band.index(theirs) > band.index(mine):
                wrong.append(f"{module}:{imp.line} imports {imp.module}, which comes after {mine} "
                             f"({' < '.join(band)})")
    return wrong


def benchmark_problems(name: str, tree: ast.Module) -> list[str]:
    """A benchmark names modules that exist, only what they define, nothing private, nothing through
    a package's __init__ but the public API, and imports nothing by a computed name."""
    wrong = [f"{name}:{line} imports by a computed name" for line in dynamic_imports(tree)]
    for imp in imports_in("benchmark", tree):
        where = f"{name}:{imp.line}"
        if imp.module.split(".")[0] != "featureshift":
            continue
        if imp.module not in MODULES:
            wrong.append(f"{where} imports {imp.module}, which is not a featureshift module")
        elif imp.name is None:
            continue
        elif is_private(imp.name):
            wrong.append(f"{where} imports the private {imp.module}.{imp.name}")
        elif imp.module == LAZY_API and imp.name not in public_api():
            wrong.append(f"{where} imports {imp.name}, which is not in featureshift's public API")
        elif imp.module in PACKAGES and imp.module != LAZY_API:
            wrong.append(f"{where} imports {imp.name} from package {imp.module}; name the module that defines it")
        elif imp.name not in defined_names(imp.module):
            wrong.append(f"{where} imports {imp.name}, which {imp.module} does not define")
    bound = module_bindings("benchmark", tree)
    for node in ast.walk(tree):
        chain = dotted(node.value) if isinstance(node, ast.Attribute) else None
        if not chain or chain[0] not in bound:
            continue
        owner, attr = ".".join([bound[chain[0]]] + chain[1:]), node.attr
        if f"{owner}.{attr}" in MODULES or f"{owner}.{attr}" in NAMESPACES:
            continue
        if owner not in MODULES:
            if owner in NAMESPACES:
                wrong.append(f"{name}:{node.lineno} uses {owner}.{attr}, which is not a featureshift module")
            continue  # an attribute of a name, checked where the name is taken
        where = f"{name}:{node.lineno}"
        if is_private(attr):
            wrong.append(f"{where} reaches the private {owner}.{attr}")
        elif owner == LAZY_API and attr not in public_api():
            wrong.append(f"{where} uses featureshift.{attr}, which is not in the public API")
        elif attr not in defined_names(owner):
            wrong.append(f"{where} uses {owner}.{attr}, which {owner} does not define")
    return wrong


def oversized(name: str, text: str) -> list[str]:
    wrong = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        wrong.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                wrong.append(f"{name}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return wrong


# --- the package ---

def test_layers_import_only_downward():
    wrong = []
    for m in MODULES:
        if m == "featureshift":
            continue
        for imp in imports(m):
            if imp.module.startswith("featureshift") and imp.module in MODULES and layer_of(imp.module) > layer_of(m):
                wrong.append(f"{m}:{imp.line} imports {imp.module}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_engines_and_foundations_import_only_groups_before_their_own():
    assert set(ENGINE_ORDER) == {g for g, layer in LAYERS.items() if layer == 1}
    groups = {group_of(m) for m in MODULES if m != "featureshift" and layer_of(m) == FOUNDATION}
    assert groups == set(FOUNDATION_ORDER), "a new foundation module needs its place in FOUNDATION_ORDER"
    wrong = [w for m in MODULES for w in band_order_violations(m, imports(m))]
    assert not wrong, "\n".join(wrong)


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
        for imp in imports(m):
            if imp.module.startswith("featureshift") and imp.module in PACKAGES and imp.name is not None:
                wrong.append(f"{m}:{imp.line} imports {imp.name} from package {imp.module}")
            if imp.module == "featureshift" and m != "featureshift":
                wrong.append(f"{m}:{imp.line} imports the top-level package")
    assert not wrong, "\n".join(wrong)


def test_package_inits_are_documentation_only():
    wrong = []
    for pkg in PACKAGES - {"featureshift"}:
        body = [n for n in tree_of(pkg).body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        if body:
            wrong.append(pkg)
    assert not wrong, f"package __init__ files with code (import from the defining module instead): {wrong}"


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for m in MODULES:
        for imp in imports(m):
            if imp.module.startswith("featureshift") and imp.name and is_private(imp.name):
                wrong.append(f"{m}:{imp.line} imports {imp.module}.{imp.name}")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_of_another_module_is_reached():
    wrong = [w for m in MODULES for w in private_reaches(m, tree_of(m))]
    assert not wrong, "\n".join(wrong)


def test_only_the_public_api_imports_by_a_computed_name():
    wrong = [f"{m}:{line}" for m in MODULES if m != LAZY_API for line in dynamic_imports(tree_of(m))]
    assert not wrong, ("imports the architecture checks cannot see (write an import statement; an optional "
                       "dependency can be imported inside try/except ImportError):\n" + "\n".join(wrong))


def test_the_public_api_loads_only_names_its_modules_define():
    wrong = []
    for name, (target, line) in lazy_exports(tree_of(LAZY_API)).items():
        module = f"{LAZY_API}.{target}"
        if module not in MODULES:
            wrong.append(f"{name}: {module} is not a module")
        elif name not in defined_names(module):
            wrong.append(f"{name}: {module} does not define it")
    assert not wrong, "\n".join(wrong)


def test_every_public_api_name_resolves_to_its_module():
    import featureshift

    for name in featureshift.__all__:
        assert getattr(featureshift, name) is not None, name


def test_no_module_over_600_lines_and_no_function_over_80():
    wrong = [w for m, path in sorted(MODULES.items()) for w in oversized(m, path.read_text())]
    assert not wrong, "\n".join(wrong)


# --- benchmarks ---

def test_benchmarks_use_featureshift_by_public_names_only():
    wrong = [w for path in BENCHMARK_FILES for w in benchmark_problems(path.name, ast.parse(path.read_text()))]
    assert not wrong, "\n".join(wrong)


# --- each check fails on a bad case ---

def parse(source: str) -> ast.Module:
    return ast.parse(textwrap.dedent(source))


def test_a_computed_import_is_found():
    tree = parse("""
        import importlib
        from importlib import import_module as load
        a = importlib.import_module("featureshift.cli")
        b = __import__("featureshift.run")
        c = load("featureshift.io")
        import featureshift.run
        """)
    assert dynamic_imports(tree) == [4, 5, 6]


def test_a_reach_into_another_modules_private_name_is_found():
    tree = parse("""
        import featureshift.models.zoo
        import featureshift.models.zoo as z
        from ..models import zoo
        from .. import run
        from ..models.zoo import build

        zoo._ARCH
        z._ARCH
        featureshift.models.zoo._ARCH
        run._SNAPSHOT_RE
        zoo.build
        build._cache
        self._own
        """)
    found = private_reaches("featureshift.commands.vis", tree)
    assert [w.split(" ", 1)[0] for w in found] == [f"featureshift.commands.vis:{n}" for n in (8, 9, 10, 11)], found
    assert private_reaches("featureshift.models.zoo", parse("from . import zoo\nzoo._ARCH\n")) == []


def test_an_import_against_the_order_inside_a_layer_is_found():
    engine = "featureshift.optvis.engine"
    assert band_order_violations(engine, imports_in(engine, parse("from ..jobs.cache import TileCache\n")))
    assert not band_order_violations(engine, imports_in(engine, parse("from .settings import RenderSettings\n")))
    report = "featureshift.report.site"
    assert not band_order_violations(report, imports_in(report, parse("from ..jobs.cache import TileCache\n")))
    io = "featureshift.io"
    assert band_order_violations(io, imports_in(io, parse("from .run import read_run\n")))
    assert not band_order_violations(io, imports_in(io, parse("from .errors import FeatureshiftError\n")))


def test_a_benchmark_that_reaches_past_public_names_is_caught():
    bad = parse("""
        import featureshift
        import featureshift.commands.timeline as tl
        from featureshift import no_such_name
        from featureshift.run import no_such_function
        from featureshift.run import _SNAPSHOT_RE
        from featureshift.jobs import cache
        from featureshift.nowhere import thing
        featureshift._EXPORTS
        featureshift.not_public
        tl._private
        importlib.import_module("featureshift.cli")
        """)
    found = benchmark_problems("bad.py", bad)
    assert sorted(int(w.split(":")[1].split(" ")[0]) for w in found) == [4, 5, 6, 8, 9, 10, 11, 12], found
    good = parse("""
        import featureshift
        import featureshift.commands.timeline
        from featureshift import render
        from featureshift.run import snapshot_path
        from featureshift.commands.timeline import timeline
        from featureshift.jobs import cache
        featureshift.render
        featureshift.commands.timeline.timeline
        cache.TileCache.read
        """)
    assert benchmark_problems("good.py", good) == []


def test_an_oversized_module_or_function_is_found():
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert oversized("m", long_function) and not oversized("m", "def f():\n" + "    x = 1\n" * 79)
    assert oversized("m", "x = 1\n" * (MAX_MODULE_LINES + 1)) and not oversized("m", "x = 1\n" * MAX_MODULE_LINES)


# --- start-up ---

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
