"""The layers of docs/architecture.md, held against the imports: the core imports no transport,
imports go down only, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "engine", "clients", "training", "genserve")
TRANSPORTS = ("grpc", "grpc_health", "grpc_reflection", "aio_pika", "aiormq", "starlette", "fastapi", "uvicorn", "httptools", "h11")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports in functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name)


@pytest.mark.parametrize("path", sources("server/pipeline"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_pipeline_core_imports_no_transport_and_no_ingress(path: Path) -> None:
    for name in imports_of(path):
        top = name.split(".")[0]
        assert top not in TRANSPORTS, f"{path.relative_to(ROOT)} imports {name}: the core takes no transport"
        assert not name.startswith(("server.grpc_edge", "server.amqp_ingress", "server.runtime")), (
            f"{path.relative_to(ROOT)} imports {name}: the core is imported by the ingresses and the runtime, never the other way"
        )


@pytest.mark.parametrize("ingress", ["server/grpc_edge", "server/http_edge", "server/amqp_ingress.py"])
def test_an_ingress_does_not_reach_into_another_or_the_runtime(ingress: str) -> None:
    paths = sources(ingress) if ingress.endswith("edge") else [ROOT / ingress]
    others = {
        "server/grpc_edge": ("server.amqp_ingress", "server.http_edge", "server.runtime"),
        "server/http_edge": ("server.amqp_ingress", "server.grpc_edge", "server.runtime"),
        "server/amqp_ingress.py": ("server.grpc_edge", "server.http_edge", "server.runtime"),
    }
    for path in paths:
        for name in imports_of(path):
            assert not name.startswith(others[ingress]), f"{path.relative_to(ROOT)} imports {name}"


def test_no_module_imports_itself_back_through_others() -> None:
    modules = {module_name(p): p for package in PACKAGES for p in sources(package)}
    graph = {name: {i for i in imports_of(path) if i in modules and i != name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_server_has_few_modules_of_its_own() -> None:
    direct = sorted(p.name for p in (ROOT / "server").glob("*.py"))
    assert len(direct) <= 8, direct


@pytest.mark.parametrize("path", sources("server"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_server_reaches_the_engine_only_through_its_face(path: Path) -> None:
    """engine/__init__.py (the facade), engine.errors and engine.logs: nothing of the engine's insides."""
    allowed = {"engine", "engine.errors", "engine.logs"}
    for name in imports_of(path):
        if name == "engine" or name.startswith("engine."):
            module = name if name in allowed else name.rsplit(".", 1)[0]
            assert module in allowed, f"{path.relative_to(ROOT)} imports {name}: the server uses engine/__init__.py's names only"


def test_importing_the_engine_face_costs_no_torch() -> None:
    """server/config.py builds its defaults from the engine's before anything heavy is imported."""
    import subprocess
    import sys

    code = "import sys, server.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _kind_names() -> list[str]:
    from engine.kinds import known_kinds

    return sorted(known_kinds())


@pytest.mark.parametrize(
    "path",
    [*sources("server"), *(ROOT / "engine").glob("*.py"), *(ROOT / "training" / f for f in ("loop.py", "eval.py", "__main__.py"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_kind_is_named_outside_its_own_module(path: Path) -> None:
    """The engine, the server and training's loop, CLI and evaluation ask a model's Kind (engine/kinds.py);
    a kind's name appears only in its own module (engine/models/, training's recipe for it)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _kind_names():
            raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} names the kind {node.value!r}")
