"""Rooms with one job: the rules of docs/architecture.md, read off the package's imports.

The rules are checked twice: on the source (every import statement, those inside
functions too, followed transitively), and by importing modules in a fresh process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return set(out.stdout.split())


def test_the_client_app_imports_no_strategy_or_server_loop():
    # Every handler parses the run config first: that must not pull in server code either.
    loaded = _modules_after_import(
        "client_app, lorm_flwr.client.handlers; from lorm_flwr.config import RunConfig; "
        "RunConfig.from_mapping({})"
    )
    assert "lorm_flwr.client.round" in loaded  # the import really happened
    server_side = sorted(
        m
        for m in loaded
        if m.startswith(
            (
                "lorm_flwr.server.strategies",
                "lorm_flwr.server.rounds",
                "lorm_flwr.server.exchange",
                "server_app",
            )
        )
    )
    assert server_side == []


def test_the_client_app_module_itself_imports_nothing_heavy():
    # A deployed message starts a fresh process that imports client_app.py; with a node worker
    # that process only relays the message, so it must not pay for torch, timm or peft.
    loaded = _modules_after_import("client_app")
    heavy = sorted(
        m
        for m in loaded
        if m.split(".")[0] in {"torch", "timm", "peft", "transformers"}
        or m == "lorm_flwr.client.round"
    )
    assert heavy == []
    assert "lorm_flwr.client.handlers" not in loaded


def test_the_math_modules_import_no_flower():
    for module in (
        "lorm_flwr.math.merge",
        "lorm_flwr.math.cross_task",
        "lorm_flwr.math.fold",
        "lorm_flwr.math.continual",
        "lorm_flwr.data.scenario",
        "lorm_flwr.models.adapters",
        "lorm_flwr.train",
    ):
        loaded = _modules_after_import(module)
        assert not any(m == "flwr" or m.startswith("flwr.") for m in loaded), module


# ------------------------------------------------------------ import rules
PACKAGE = ROOT / "lorm_flwr"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every module ``path`` imports, anywhere in it (function bodies too): package
    modules by full name, other packages by their top-level name."""
    found: set[str] = set()

    def add(name: str) -> None:
        found.add(name if name.startswith("lorm_flwr") else name.split(".")[0])

    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; the rules read absolute ones")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # `from pkg import module` imports that module
                sub = f"{node.module}.{alias.name}"
                add(sub if sub in modules else node.module)
    return found


def _graph(by_name: bool = True) -> dict[str, set[str]]:
    """Module -> what it imports. ``by_name``: a module that calls the registry's
    ``strategy_class`` imports the strategies by name (importlib), so the room rules count
    those; the circle test does not (a strategy reads the config, which reads the
    registry's names and never calls it)."""
    from lorm_flwr.registry import STRATEGIES

    strategies = {target.split(":")[0] for target in STRATEGIES.values()}
    names = _module_names()
    graph = {name: _imports(path, set(names)) for name, path in names.items()}
    if by_name:
        for name, path in names.items():
            calls = [
                n for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Call)
                and getattr(n.func, "id", getattr(n.func, "attr", "")) == "strategy_class"
            ]  # fmt: skip
            if calls:
                graph[name] |= strategies
    return graph


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """What importing ``start`` may run: its imports, theirs, and every package
    ``__init__`` on the way (importing ``a.b.c`` runs ``a.b`` first)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        for target in [*graph.get(name, ()), *parents]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen - {start}


def _room(module: str) -> str:
    parts = module.split(".")
    return (
        parts[1]
        if len(parts) > 2 or module.endswith(("math", "wire", "client", "server"))
        else "shared"
    )


def test_the_package_has_no_import_circle():
    graph = _graph(by_name=False)
    # Tarjan's strongly connected components, on the explicit imports only.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_client_and_server_never_import_each_other():
    graph = _graph()
    for module in graph:
        reached = _closure(graph, module)
        for mine, theirs in (("client", "server"), ("server", "client")):
            if _room(module) == mine:
                bad = sorted(m for m in reached if m.startswith(f"lorm_flwr.{theirs}"))
                assert bad == [], f"{module} imports {bad}"
    for app, theirs in (("client_app", "server"), ("server_app", "client")):
        imported = _imports(ROOT / f"{app}.py", set(graph))
        reached = set().union(imported, *(_closure(graph, m) for m in imported))
        bad = sorted(m for m in reached if m.startswith(f"lorm_flwr.{theirs}"))
        assert bad == [], f"{app}.py imports {bad}"


def test_math_imports_only_math_and_torch():
    graph = _graph()
    for module in (m for m in graph if _room(m) == "math"):
        reached = _closure(graph, module)
        package = sorted(m for m in reached if m.startswith("lorm_flwr.") and _room(m) != "math")
        assert package == [], f"{module} imports {package}"
        assert "flwr" not in reached, module


def test_math_data_models_and_the_training_loops_never_import_flower():
    graph = _graph()
    rooms = {"math", "data", "models"}
    checked = [m for m in graph if _room(m) in rooms or m == "lorm_flwr.train"]
    assert "lorm_flwr.models.adapters" in checked and "lorm_flwr.data.scenario" in checked
    for module in checked:
        assert "flwr" not in _closure(graph, module), module


def test_the_rules_see_a_violation():
    """The reader is not blind: a function-level import is found, and followed."""
    graph = _graph()
    assert "lorm_flwr.registry" in _closure(graph, "lorm_flwr.config")  # imported in a method
    assert "flwr" in _closure(graph, "lorm_flwr.server.rounds")
    assert "lorm_flwr.wire" in _closure(graph, "lorm_flwr.client.products")  # a package __init__
    assert "lorm_flwr.server.strategies.lorm" in graph["lorm_flwr.server.run"]  # by name


def test_the_app_bundle_holds_the_app_and_no_harness(tmp_path):
    """What every `flwr run` ships: the app's code, presets and license; no tests,
    benchmarks or the loopback harness (harness/)."""
    import zipfile

    subprocess.run(
        [str(Path(sys.executable).with_name("flwr")), "build", "--app", str(ROOT)],
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    (fab,) = tmp_path.glob("*.fab")
    names = set(zipfile.ZipFile(fab).namelist())
    assert {"client_app.py", "server_app.py", "lorm_flwr/server/run.py"} <= names
    package = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert package <= names  # every module of the package
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "harness/"))]
    # Publishable: fab-format-version = 1 built (it needs a license file and a Flower lower
    # bound), with the Apache-2.0 text pyproject.toml names; small, being the app alone.
    assert "LICENSE" in names and "Apache License" in (ROOT / "LICENSE").read_text()
    assert fab.stat().st_size < 2**20


def test_the_old_public_imports_still_work():
    """Moved modules users import keep working: a deprecation names the new place."""
    import importlib
    import warnings

    sys.modules.pop("lorm_flwr.export", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("lorm_flwr.export")
    from lorm_flwr.models.export import load_classifier

    assert old.load_classifier is load_classifier
    assert any("lorm_flwr.models.export" in str(w.message) for w in caught)
    out = subprocess.run(
        [sys.executable, "-m", "lorm_flwr.plan", "learning-rate=0.01"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert "did you mean 'lr'?" in out.stdout + out.stderr
