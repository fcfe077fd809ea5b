"""The layout rules, checked on every module's source (ast): imports flow one way, no
function over 60 lines, no call with more than five positional arguments."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("shared_models", "client", "server")
# What each room, or each package of a room, must never import (a file obeys every entry
# whose folder holds it). shared_models is what both sides agree on; the hospital never
# depends on the coordinator; the coordinator reaches the hospital side only where the
# command line and the simulation launcher wire both roles together. Inside server/, by
# job: the run (with SecAgg+ inside it) knows nothing of what starts it; the simulation
# and the coordinator do not know each other; the benchmarks sit on the simulation.
LAUNCHERS = ("medfed.server.cli", "medfed.server.simulation", "medfed.server.coordinator",
             "medfed.server.bench")  # fmt: skip
FORBIDDEN = {
    "shared_models": ("medfed.server", "medfed.client"),
    "client": ("medfed.server",),
    "server": ("medfed.client",),
    "server/run": LAUNCHERS,
    "server/secagg": LAUNCHERS,
    "server/simulation": ("medfed.server.cli", "medfed.server.coordinator", "medfed.server.bench"),
    "server/coordinator": ("medfed.server.cli", "medfed.server.simulation", "medfed.server.bench"),
    "server/bench": ("medfed.server.cli", "medfed.server.coordinator"),
}
WIRING = {"server/cli.py", "server/simulation/simulate.py"}  # may import medfed.client
# The round loop, the secure workflow, the hospital's app, handlers and mods, the tasks and
# the data layer: every public class and function says what it is for.
DOCUMENTED = (
    "server/run/round_loop.py", "server/run/exchange.py", "server/run/replies.py",
    "server/run/run_record.py", "server/run/round_outputs.py", "server/run/strategies.py",
    "server/secagg", "client/app.py", "client/handlers.py", "client/safe_errors.py",
    "client/outbound_audit.py", "client/settings.py", "client/privacy", "client/data",
    "shared_models/tasks", "shared_models/task_descriptions.py",
)  # fmt: skip
LONGEST_FUNCTION = 60
MOST_POSITIONAL = 5


def _sources(root: Path):
    for room in ROOMS:
        for path in sorted((root / room).rglob("*.py")):
            yield room, path.relative_to(root), ast.parse(path.read_text(), str(path))


def _forbidden(rel: Path) -> tuple[str, ...]:
    """What the file at `rel` must not import: every entry of FORBIDDEN whose folder holds
    it (a wiring module may import the hospital side)."""
    folders = {"/".join(rel.parts[:i]) for i in range(1, len(rel.parts))}
    forbidden = [m for folder, ms in FORBIDDEN.items() if folder in folders for m in ms]
    if rel.as_posix() in WIRING:
        forbidden = [m for m in forbidden if m != "medfed.client"]
    return tuple(forbidden)


def _imports(rel: Path, tree: ast.AST):
    """(line, absolute module name) of every import, relative ones resolved."""
    package = ["medfed", *rel.parent.parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from medfed import client` imports medfed.client
                yield node.lineno, f"{module}.{alias.name}"


def layering_violations(root: Path) -> list[str]:
    """'file:line imports module' for every import against the layering rule."""
    found = []
    for _, rel, tree in _sources(root):
        forbidden = _forbidden(rel)
        for line, module in _imports(rel, tree):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{rel.as_posix()}:{line} imports {module}")
    return found


def _nodes(root: Path, kind: type | tuple[type, ...]):
    """(file, node) for every ast node of `kind` in the sources."""
    for _, rel, tree in _sources(root):
        for node in ast.walk(tree):
            if isinstance(node, kind):
                yield rel.as_posix(), node


def long_functions(root: Path) -> list[str]:
    functions = _nodes(root, (ast.FunctionDef, ast.AsyncFunctionDef))
    return [
        f"{rel}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for rel, node in functions
        if node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]


def long_positional_calls(root: Path) -> list[str]:
    return [
        f"{rel}:{node.lineno} passes {len(node.args)} positionally"
        for rel, node in _nodes(root, ast.Call)
        if len(node.args) > MOST_POSITIONAL
    ]


def _write(root: Path, sources: dict[str, str]) -> None:
    for name, text in sources.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_imports_flow_one_way():
    assert layering_violations(ROOT) == []


def test_the_layering_check_names_the_file_and_the_import(tmp_path):
    sources = {
        "client/bad.py": "from medfed.server.app import app\n",
        "client/data/relative.py": "from ...server import telemetry\n",
        "shared_models/leak.py": "import medfed.client.handlers\n",
        "server/round.py": "\nfrom medfed.client import handlers\n",
        "server/cli.py": "from medfed.client.hospital_commands import add_node_commands\n",
        "server/fine.py": "from medfed.shared_models import protocol\n",
        "client/package.py": "from medfed import server\n",
    }
    _write(tmp_path, sources)
    assert sorted(set(layering_violations(tmp_path))) == [
        "client/bad.py:1 imports medfed.server.app",
        "client/bad.py:1 imports medfed.server.app.app",
        "client/data/relative.py:1 imports medfed.server",
        "client/data/relative.py:1 imports medfed.server.telemetry",
        "client/package.py:1 imports medfed.server",
        "server/round.py:2 imports medfed.client",
        "server/round.py:2 imports medfed.client.handlers",
        "shared_models/leak.py:1 imports medfed.client.handlers",
    ]


def test_server_packages_import_by_job(tmp_path):
    """The run never reaches for what starts it; the launchers do not reach for each other;
    the simulation launcher may wire the hospital side in, nothing else of the run may."""
    sources = {
        "server/run/round_loop.py": "from medfed.server.simulation import progress\n",
        "server/secagg/workflow.py": "from medfed.server.run.replies import RoundReplies\n",
        "server/run/report.py": "import medfed.server.coordinator.start\n",
        "server/coordinator/start.py": "from medfed.server.run import run_status\n",
        "server/coordinator/proxy.py": "from medfed.server.simulation.simulate import run\n",
        "server/simulation/simulate.py": "from medfed.client.data.site import load_site\n",
        "server/simulation/progress.py": "from medfed.client.data import site\n",
        "server/bench/quality.py": "from medfed.server.simulation.simulate import run\n",
    }
    _write(tmp_path, sources)
    assert sorted(set(layering_violations(tmp_path))) == [
        "server/coordinator/proxy.py:1 imports medfed.server.simulation.simulate",
        "server/coordinator/proxy.py:1 imports medfed.server.simulation.simulate.run",
        "server/run/report.py:1 imports medfed.server.coordinator.start",
        "server/run/round_loop.py:1 imports medfed.server.simulation",
        "server/run/round_loop.py:1 imports medfed.server.simulation.progress",
        "server/simulation/progress.py:1 imports medfed.client.data",
        "server/simulation/progress.py:1 imports medfed.client.data.site",
    ]


def import_cycles(root: Path) -> list[list[str]]:
    """Every group of modules that import each other, directly or around a loop (any import:
    at the top, in a function, for type checking), each group sorted."""
    modules = {}
    for _, rel, tree in _sources(root):
        name = ".".join(["medfed", *rel.with_suffix("").parts]).removesuffix(".__init__")
        modules[name] = (rel, tree)
    graph = {
        name: {
            target
            for _, imported in _imports(rel, tree)
            # a module, or a name in one (`from module import name`)
            for target in [imported if imported in modules else imported.rpartition(".")[0]]
            if target in modules and target != name
        }
        for name, (rel, tree) in modules.items()
    }
    return sorted(sorted(group) for group in _strongly_connected(graph) if len(group) > 1)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def test_the_cycle_check_names_every_module_of_a_loop(tmp_path):
    sources = {
        "shared_models/config.py": "def f():\n    from medfed.shared_models.tasks import TASKS\n",
        "shared_models/tasks/__init__.py": "from medfed.shared_models.tasks.base import Task\n",
        "shared_models/tasks/base.py": "from medfed.shared_models.config import RunConfig\n",
        "shared_models/protocol.py": "",
        "server/run/exchange.py": "from medfed.shared_models import protocol\n",
    }
    _write(tmp_path, sources)
    assert import_cycles(tmp_path) == [
        [
            "medfed.shared_models.config",
            "medfed.shared_models.tasks",
            "medfed.shared_models.tasks.base",
        ]
    ]


def test_no_modules_import_each_other():
    assert import_cycles(ROOT) == []


def test_no_function_is_over_sixty_lines():
    assert long_functions(ROOT) == []


def test_no_call_passes_more_than_five_arguments_by_position():
    assert long_positional_calls(ROOT) == []


def test_the_size_checks_can_fail(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(LONGEST_FUNCTION))
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "big.py").write_text(f"def big():\n{body}    f(1, 2, 3, 4, 5, 6)\n")
    assert long_functions(tmp_path) == [f"server/big.py:1 big has {LONGEST_FUNCTION + 2} lines"]
    assert long_positional_calls(tmp_path) == [
        f"server/big.py:{LONGEST_FUNCTION + 2} passes 6 positionally"
    ]


def undocumented(module_name: str) -> list[str]:
    """Public classes, functions and methods defined in the module without a docstring
    (an override inherits the documentation of the method it overrides)."""
    module = importlib.import_module(module_name)
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
            missing.append(f"{module_name}.{name}")
        if not inspect.isclass(obj):
            continue
        for attr, member in vars(obj).items():
            method = callable(member) or isinstance(member, property)
            if method and not attr.startswith("_") and not inspect.getdoc(getattr(obj, attr)):
                missing.append(f"{module_name}.{name}.{attr}")
    return missing


def test_the_round_loop_workflow_tasks_and_data_layer_are_documented():
    modules = []
    for entry in DOCUMENTED:
        paths = [ROOT / entry] if entry.endswith(".py") else sorted((ROOT / entry).glob("*.py"))
        for path in paths:
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append(".".join(["medfed", *parts]).removesuffix(".__init__"))
    assert len(modules) > 20
    assert [name for module in modules for name in undocumented(module)] == []
