"""The package's architecture, checked: imports point one way, the listener knows nothing of
runs, no module reaches into another's private names, and SQL lives in ``repository`` only.

Read from the source with ``ast``, so a wrong import fails here before it confuses a reader.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "registry"

#: Each module's layer: a module may import only modules of lower layers.
LAYERS = {
    "batching": 0,
    "distribution": 0,
    "errors": 0,
    "notifications": 0,
    "models": 1,
    "telemetry": 1,
    "settings": 2,
    "tables": 2,
    "urls": 2,
    "database": 3,
    "embedded": 3,
    "repository": 4,
    "connections": 5,
    "listener": 5,
    "schema": 5,
    "watch": 5,
    "forwarding": 6,
    "inbox": 6,
    "doctor": 6,
    "health": 6,
    "inspection": 6,
    "locate": 6,
    "publisher": 6,
    "streams": 6,
    "upkeep": 6,
    "handle": 7,
    "scope": 8,
    "registry": 9,
    "console": 10,
    "demo": 11,
    "testing": 11,
    "__init__": 12,
    "cli_base": 12,
    "cli_ops": 13,
    "cli_streams": 13,
    "cli": 14,
    # optional integrations: above the whole package, each behind its extra
    "contrib/__init__": 13,
    "contrib/framing": 13,
    "contrib/lifespan": 13,
    "contrib/asgi": 14,
}


def module_name(path: Path) -> str:
    """A module's key in LAYERS: its path under the package without ``.py``
    (``registry``, ``contrib/asgi``)."""
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def modules() -> dict[str, ast.Module]:
    paths = sorted(PACKAGE.rglob("*.py"))
    return {module_name(path): ast.parse(path.read_text()) for path in paths}


def _layer_key(parts: list[str]) -> str:
    # registry.contrib.asgi is contrib/asgi; registry.contrib alone is contrib/__init__
    key = "/".join(parts)
    return key if key in LAYERS else f"{key}/__init__"


def imported(tree: ast.Module) -> set[str]:
    """The package's modules that ``tree`` imports (``from registry import x`` is ``__init__``
    unless ``x`` is a module)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            parts = node.module.split(".")
            if parts[0] != "registry":
                continue
            if len(parts) > 1:
                names.add(_layer_key(parts[1:]))
            else:
                names.update(
                    alias.name if alias.name in LAYERS else "__init__" for alias in node.names
                )
        elif isinstance(node, ast.Import):
            names.update(
                _layer_key(alias.name.split(".")[1:])
                for alias in node.names
                if alias.name.startswith("registry.")
            )
    return names


def test_every_module_has_a_layer() -> None:
    assert set(modules()) == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_point_down(name: str) -> None:
    tree = modules()[name]
    upward = {other for other in imported(tree) - {name} if LAYERS[other] >= LAYERS[name]}
    assert upward == set(), f"{name} imports {sorted(upward)} from its own layer or above"


def test_the_listener_imports_only_the_notification_protocol() -> None:
    assert imported(modules()["listener"]) == {"notifications"}


def test_the_layer_check_sees_an_upward_import() -> None:
    # the checker itself: a module importing one above it is found
    tree = ast.parse("from registry.registry import RunRegistry\nfrom registry import cli\n")
    assert imported(tree) == {"registry", "cli"}


def test_the_layer_check_sees_a_subpackage() -> None:
    tree = ast.parse("from registry.contrib.asgi import registry_routes\nimport registry.contrib\n")
    assert imported(tree) == {"contrib/asgi", "contrib/__init__"}


def private_reach(tree: ast.Module) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``: another object's private attribute."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
        ):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


# names of third-party objects whose underscore attributes are their documented API
_ALLOWED_PRIVATE = {"_asdict", "_fields", "_replace", "_mapping"}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_no_module_reaches_into_private_names(name: str) -> None:
    reached = [
        hit
        for hit in private_reach(modules()[name])
        if hit.split(".", 1)[1] not in _ALLOWED_PRIVATE
    ]
    assert reached == []


# statement openings as SQL is written (upper case), not English words in docstrings
_SQL = re.compile(
    r"^\s*(SELECT\s|INSERT INTO\s|UPDATE \w+ SET\s|DELETE FROM\s|WITH \w+ AS\s"
    r"|CREATE (DATABASE|TABLE|INDEX)\s|DROP (DATABASE|TABLE)\s|GRANT\s|ALTER\s)"
)


def test_the_sql_check_sees_a_statement() -> None:
    assert _SQL.match("\n    SELECT run_id FROM runs")
    assert _SQL.match("UPDATE runs SET status = 'x'")
    assert not _SQL.match("Delete the stream chunks of runs that ended")


@pytest.mark.parametrize("name", sorted(set(LAYERS) - {"repository"}))
def test_sql_lives_in_the_repository_only(name: str) -> None:
    statements = [
        node.value
        for node in ast.walk(modules()[name])
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.match(node.value)
    ]
    assert statements == []
