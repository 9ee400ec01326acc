"""The built wheel, installed in a virtual environment of its own, works from its console
script: help, version, a migrate next to an application's own Alembic history, a check."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from registry.distribution import DISTRIBUTION
from tests.cli.runner import environment
from tests.helpers.database import fetch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: a wheel build, an install and five commands
BUILD_DEADLINE = 120.0


def _run(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in ``cwd``, outside the checkout (``python -c`` imports from there)."""
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=BUILD_DEADLINE,
        env=env,
        check=False,
    )


def _build_wheel(into: Path) -> Path:
    """The project's wheel, built by the backend installed here, else by one pip fetches."""
    command: list[str | Path] = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
    if importlib.util.find_spec("hatchling") is not None:
        command.append("--no-build-isolation")
    built = _run(*command, "-w", into, ROOT, cwd=into.parent)
    if built.returncode != 0:
        if "--no-build-isolation" not in command:
            pytest.skip("no build backend here and the package index cannot be reached")
        raise AssertionError(f"pip wheel failed:\n{built.stderr}")
    (wheel,) = into.glob("*.whl")
    return wheel


def _environment_with(wheel: Path, home: Path) -> Path:
    """A fresh environment holding ``wheel`` alone; its dependencies are this environment's,
    reached through a ``.pth`` line (no download); returns its interpreter."""
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(home)
    python = home / "bin" / "python"
    own = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=home)
    Path(own.stdout.strip(), "outer.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n", encoding="utf-8"
    )
    installed = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel,
        cwd=home,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    return python


async def test_the_wheel_installs_and_runs(registry_database_url: str, tmp_path: Path) -> None:
    url = registry_database_url
    wheel = await asyncio.to_thread(_build_wheel, tmp_path / "dist")
    python = await asyncio.to_thread(_environment_with, wheel, tmp_path / "env")
    where = _run(python, "-c", "import registry; print(registry.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "env"), where

    # an application's database: its own Alembic history and its own ``runs`` table
    await fetch(url, "DROP SCHEMA registry CASCADE")
    await fetch(url, "CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)")
    await fetch(url, "INSERT INTO public.alembic_version VALUES ('app0001')")
    await fetch(url, "CREATE TABLE public.runs (id serial PRIMARY KEY, app_payload text)")
    await fetch(url, "INSERT INTO public.runs (app_payload) VALUES ('the app''s row')")

    script = python.with_name("registry")
    env = environment({"REGISTRY_DATABASE_URL": url, "PATH": os.environ.get("PATH", "")})

    def registry(*args: str) -> subprocess.CompletedProcess[str]:
        return _run(script, *args, cwd=tmp_path, env=env)

    shown = await asyncio.to_thread(registry, "--help")
    assert shown.returncode == 0, shown
    assert "migrate" in shown.stdout
    version = await asyncio.to_thread(registry, "--version")
    assert version.returncode == 0, version
    assert DISTRIBUTION in version.stdout
    migrated = await asyncio.to_thread(registry, "migrate")
    assert migrated.returncode == 0, migrated
    checked = await asyncio.to_thread(registry, "check")
    assert checked.returncode == 0, checked

    assert await fetch(url, "SELECT version_num FROM public.alembic_version") == [
        {"version_num": "app0001"}
    ]
    assert await fetch(url, "SELECT app_payload FROM public.runs") == [
        {"app_payload": "the app's row"}
    ]
    tables = await fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'registry'")
    assert {"runs", "alembic_version"} <= {row["tablename"] for row in tables}
