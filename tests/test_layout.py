"""The layout rules, checked on every module's source (ast): imports flow one way, no
function over 60 lines, no call with more than five positional arguments."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What each room must never import. shared_models is what both sides agree on;
# the hospital never depends on the coordinator; the coordinator reaches the
# hospital side only where the command line and the simulation launcher wire
# both roles together.
FORBIDDEN = {
    "shared_models": ("medfed.server", "medfed.client"),
    "client": ("medfed.server",),
    "server": ("medfed.client",),
}
WIRING = {"server/cli.py", "server/simulate.py"}
# The round loop, the secure workflow, the hospital's handlers and mods, the tasks and
# the data layer: every public class and function says what it is for.
DOCUMENTED = (
    "server/round_loop.py", "server/exchange.py", "server/secure_aggregation.py",
    "server/unmasking.py", "server/run_record.py", "server/strategies.py",
    "client/app.py", "client/handlers.py", "client/privacy", "client/data", "shared_models/tasks",
)  # fmt: skip
LONGEST_FUNCTION = 60
MOST_POSITIONAL = 5


def _sources(root: Path):
    for room in FORBIDDEN:
        for path in sorted((root / room).rglob("*.py")):
            yield room, path.relative_to(root), ast.parse(path.read_text(), str(path))


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
    for room, rel, tree in _sources(root):
        if rel.as_posix() in WIRING:
            continue
        for line, module in _imports(rel, tree):
            if module.startswith(FORBIDDEN[room]):
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


def test_imports_flow_one_way():
    assert layering_violations(ROOT) == []


def test_the_layering_check_names_the_file_and_the_import(tmp_path):
    sources = {
        "client/bad.py": "from medfed.server.app import app\n",
        "client/data/relative.py": "from ...server import telemetry\n",
        "shared_models/leak.py": "import medfed.client.handlers\n",
        "server/round.py": "\nfrom medfed.client import handlers\n",
        "server/cli.py": "from medfed.client.cli import add_node_commands\n",
        "server/fine.py": "from medfed.shared_models import protocol\n",
        "client/package.py": "from medfed import server\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
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
