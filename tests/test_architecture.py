"""The house rules, checked: one namespace, layers that point one way (the
import-linter contracts in pyproject.toml), no import cycles, no private
names imported across modules, one registry per concept that every side
agrees with, and a clean ruff run.

import-linter reads a package from one directory tree, while the repository
keeps the namespace's packages in the user's top-level folders (mapped by
``[tool.setuptools.package-dir]``). So the checks run on a staged copy of the
namespace laid out as the wheel lays it out, built from that same mapping.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]
BIN = Path(sys.executable).parent


def stage_namespace(into: Path) -> Path:
    """Copy every mapped package to where the wheel puts it; returns the staged root."""
    for package, folder in sorted(PACKAGE_DIRS.items()):
        target = into.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "recipes", "profiles", "*.json"))
    return into


def lint_imports(staged: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=staged,
                          env={**os.environ, "PYTHONPATH": str(staged)})


def modules(staged: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((staged / "edgetailor").rglob("*.py")):
        parts = path.relative_to(staged).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return stage_namespace(tmp_path_factory.mktemp("namespace"))


def test_every_package_folder_is_in_the_wheel():
    listed = set(PACKAGES)
    on_disk = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((package, *relative)))
    assert on_disk == listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_import_contracts_hold(staged):
    proc = lint_imports(staged)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, planted, contract", [
    ("device/mixture.py", "import edgetailor.server_side.training", "layers point one way"),
    ("toolkit/bundle.py", "from edgetailor.device import runtime", "layers point one way"),
    ("server_side/pretrain.py", "from edgetailor.export import bundle", "layers point one way"),
    ("export/bundle.py", "from edgetailor.app import demo", "layers point one way"),
    ("export/formats.py", "import edgetailor.device.runtime", "export does not use the device runtime"),
    ("device/store.py", "import torch", "run without torch"),
])
def test_a_planted_forbidden_import_breaks_the_contracts(tmp_path, module, planted, contract):
    staged = stage_namespace(tmp_path)
    package, _, rest = module.partition("/")
    target = staged / "edgetailor" / package / rest
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    proc = lint_imports(staged)
    assert proc.returncode != 0, proc.stdout
    assert contract in proc.stdout and "BROKEN" in proc.stdout


def _imports(path: Path, module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((base, [alias.name for alias in node.names]))
    return found


def test_no_private_names_imported_across_modules(staged):
    offenders = []
    for module, path in modules(staged).items():
        for imported, names in _imports(path, module):
            if not imported.startswith("edgetailor") or imported == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [part for part in imported.split(".") if part.startswith("_") and part != "__init__"]
            offenders += [f"{module}: from {imported} import {n}" for n in private]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def import_cycles(staged: Path) -> list[set[str]]:
    """import-linter has no contract for cycles between arbitrary modules, so
    the strongly connected components of grimp's import graph are found here."""
    script = ("import grimp, json; g = grimp.build_graph('edgetailor', cache_dir=None); "
              "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))")
    # a fresh interpreter, so that grimp finds the staged copy rather than the editable install
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=staged,
                          env={**os.environ, "PYTHONPATH": str(staged)})
    assert proc.returncode == 0, proc.stderr
    edges = {m: {i for i in imported if i.startswith("edgetailor")}
             for m, imported in json.loads(proc.stdout).items() if m.startswith("edgetailor")}
    assert len(edges) > 50, f"grimp found only {sorted(edges)}"
    return _strongly_connected(edges)


def test_no_import_cycles(staged):
    cycles = import_cycles(staged)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(sorted(c)) for c in cycles)


def test_a_planted_cycle_is_found(tmp_path):
    staged = stage_namespace(tmp_path)
    atomic = staged / "edgetailor" / "toolkit" / "atomic.py"
    atomic.write_text(atomic.read_text() + "\nimport edgetailor.toolkit.bundle  # planted by the test\n")
    planted = {"edgetailor.toolkit.atomic", "edgetailor.toolkit.bundle"}
    assert any(planted <= cycle for cycle in import_cycles(staged))   # bundle reaches atomic directly and via signing


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; components of more than one module are cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_format_registry_is_what_every_side_reads():
    from edgetailor.device.backends import BACKENDS
    from edgetailor.export.formats import EXPORTERS
    from edgetailor.export.trainable import TRAINING_EXPORTERS
    from edgetailor.server_side.compress.recipe import ExportConfig
    from edgetailor.toolkit.formats import DEFAULT_FORMATS, FORMATS, TRAINING_FORMATS
    from edgetailor.toolkit.manifest import manifest_schema

    assert list(EXPORTERS) == list(FORMATS)
    # every training kind of every format has its exporter and a backend that runs it
    kinds = {(name, kind) for name in TRAINING_FORMATS for kind in FORMATS[name].training_kinds}
    assert set(TRAINING_EXPORTERS) == kinds
    assert {(info.format, info.training) for info in BACKENDS.values()} == kinds
    assert set(ExportConfig().formats) <= set(DEFAULT_FORMATS)
    schema = manifest_schema()
    assert schema["$defs"]["format_name"]["enum"] == list(FORMATS)
    training = schema["$defs"]["trainable"]["properties"]["training"]["properties"]
    assert {name: spec["propertyNames"]["enum"] for name, spec in training.items()} == \
        {name: list(FORMATS[name].training_roles) for name in TRAINING_FORMATS}


def test_every_compression_stage_config_has_its_runner():
    from edgetailor.server_side.compress.recipe import STAGE_CONFIGS
    from edgetailor.server_side.compress.stages import STAGES

    assert set(STAGES) == set(STAGE_CONFIGS)


def test_ruff_is_clean():
    proc = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", str(ROOT)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_wheel_installs_one_namespace(tmp_path):
    """What `pip install .` puts in site-packages: `edgetailor` and its
    dist-info, nothing named toolkit, device, export or server_side."""
    import zipfile

    pytest.importorskip("setuptools", minversion="68", reason="building the wheel needs setuptools>=68 installed")
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "results",
                                                                "__pycache__", "edgetailor-demo", "node_modules"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("edgetailor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"edgetailor", next(t for t in top if t.endswith(".dist-info"))}
    for data in ("edgetailor/toolkit/manifest.schema.json", "edgetailor/toolkit/recipes/default.toml",
                 "edgetailor/server_side/compress/recipes/int8.toml",
                 "edgetailor/server_side/learngene/profiles/wearable.toml", "edgetailor/app/cli.py",
                 "edgetailor/device/backends/ort.py", "edgetailor/server_side/learngene/rules.py"):
        assert data in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "edgetailor = edgetailor.app.cli:main" in entry_points
    # installed from the wheel (not the checkout), the namespace imports and finds its package data
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                           str(site), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    script = ("import edgetailor.device, edgetailor.toolkit.manifest as m, edgetailor.toolkit.config as c; "
              "print(edgetailor.device.__file__); m.manifest_schema(); c.load_recipe('default')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(site / "edgetailor" / "device"))
