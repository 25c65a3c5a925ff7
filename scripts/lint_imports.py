"""Check the import contracts of ``[tool.importlinter]`` in pyproject.toml (import-linter).

import-linter's graph builder (grimp) finds a package's modules by walking the directory of
its ``__init__.py``. curvops maps top-level folders into its namespace with setuptools'
``package-dir`` (``curvops.linops`` = ``linops/``, ...), so from an editable install grimp
sees ``src/curvops`` only and none of the subpackages (and it refuses subpackages of a
regular package as root packages). This script lays out the package as an installation
would, in a temporary folder of links that follows ``[tool.setuptools]`` ``packages`` and
``package-dir`` exactly, puts that folder first on ``PYTHONPATH`` and runs ``lint-imports``
there. The links point at the working tree, so the check reads the files as they are.

Usage::

    python scripts/lint_imports.py [lint-imports options]
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest brings there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """Each package of the distribution and the folder its modules live in.

    Args:
        pyproject: The ``pyproject.toml`` that declares ``[tool.setuptools]`` ``packages``
            and ``package-dir``.

    Returns:
        ``{package name: folder}``, resolved like setuptools does: the longest mapped
        prefix of the name, then one folder per remaining name component.
    """
    setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools.get("package-dir", {})
    dirs = {}
    for package in setuptools["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping or cut == 0:
                base = mapping.get(prefix, "")
                dirs[package] = (pyproject.parent / base).joinpath(*parts[cut:])
                break
    return dirs


def stage(dest: Path, dirs: dict[str, Path]) -> None:
    """Link every module of every package into ``dest`` in the installed layout.

    Args:
        dest: An empty folder.
        dirs: The output of :func:`package_dirs`.

    Raises:
        FileNotFoundError: If a package's folder has no ``__init__.py``.
    """
    for package, folder in dirs.items():
        if not (folder / "__init__.py").is_file():
            raise FileNotFoundError(f"{package}: no __init__.py in {folder}")
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in folder.glob("*.py"):
            (target / module.name).symlink_to(module.resolve())


def main(argv: list[str]) -> int:
    """Stage the package and run ``lint-imports`` on it; returns its exit status."""
    with tempfile.TemporaryDirectory(prefix="curvops-lint-imports-") as tmp:
        stage(Path(tmp), package_dirs(ROOT / "pyproject.toml"))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH")]))
        lint = Path(sysconfig.get_path("scripts")) / "lint-imports"
        cmd = [str(lint), "--no-cache", *argv, str(ROOT / "pyproject.toml")]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
