"""The distribution claims one import name: a wheel of the repository holds `babelcap/` (with
every package folder that package-dir maps in, and their data files) and its dist-info, nothing
else; installed into a fresh virtual environment, `babelcap.training` imports and `training`,
`world`, `pipelines` and `translators` do not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NAME = "babelcap"
PIP = (sys.executable, "-m", "pip")
# Folders at the top of the repository that must only ever be installed under babelcap.
NOT_TOP_LEVEL = ("training", "world", "pipelines", "translators", "beam_runner")
# What the build never needs (and what must not leak into it from a developer's checkout).
SKIP = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".*_cache"
)


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def expected_files() -> tuple[set[str], set[str], set[str]]:
    """From the folders on disk: (package names, .py paths, data paths) the wheel must hold.

    A package is a folder with `__init__.py` under a folder that package-dir maps (or under
    `babelcap/`), so a subpackage that the explicit `packages` list forgot is expected too."""
    tool = _setuptools()
    mapping = {NAME: NAME, **tool.get("package-dir", {})}
    patterns = tool.get("package-data", {}).get("*", [])
    roots = {(REPO / folder).resolve(): package for package, folder in mapping.items()}
    packages: set[str] = set()
    py: set[str] = set()
    data: set[str] = set()
    for root, package in roots.items():
        for init in root.rglob("__init__.py"):
            folder = init.parent
            if "__pycache__" in folder.parts:
                continue
            # The nearest mapped folder names the package (a mapped folder inside another).
            base = next(d for d in (folder, *folder.parents) if d in roots)
            if base != root:
                continue
            rel = folder.relative_to(root).parts
            if any(not (root.joinpath(*rel[:i]) / "__init__.py").exists() for i in range(len(rel))):
                continue  # below a plain folder: not a package
            name = ".".join([package, *rel])
            packages.add(name)
            where = "/".join(name.split("."))
            py |= {f"{where}/{f.name}" for f in folder.glob("*.py")}
            data |= {f"{where}/{f.name}" for p in patterns for f in folder.glob(p) if f.is_file()}
    return packages, py, data


def _source_copy(dest: Path) -> Path:
    """The repository's files (tracked and untracked-but-not-ignored) copied to `dest`, so the
    build's `build/` and egg-info never touch the working tree."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=SKIP)
        return dest
    for raw in filter(None, listed):
        rel = raw.decode()
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    out = tmp / "dist"
    proc = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (built,) = out.glob(f"{NAME}-*.whl")
    return built


def test_the_package_list_names_every_package_folder():
    packages, _, _ = expected_files()
    listed = set(_setuptools()["packages"])
    assert packages - listed == set(), "package folders missing from [tool.setuptools] packages"
    assert listed - packages == set(), "[tool.setuptools] packages names a folder that is not one"


def test_wheel_holds_babelcap_only_and_every_module(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.startswith(f"{NAME}-") and t.endswith(".dist-info")}
    assert len(dist_info) == 1, top
    assert top - dist_info == {NAME}, f"top-level entries besides babelcap/: {top - {NAME}}"
    for other in NOT_TOP_LEVEL:
        assert not any(n.split("/", 1)[0] in (other, f"{other}.py") for n in names), other

    _, py, data = expected_files()
    assert {"babelcap/training/__init__.py", "babelcap/world/models/__init__.py"} <= py
    missing = sorted(py - names)
    assert not missing, f"modules on disk missing from the wheel: {missing}"
    assert "babelcap/translators/languages.json" in data
    missing = sorted(data - names)
    assert not missing, f"package data missing from the wheel: {missing}"

    (info,) = dist_info
    top_level = f"{info}/top_level.txt"
    if top_level in names:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == [NAME]


CHECK = r"""
import importlib, json, sys
result = {"missing": {}}
import babelcap, babelcap.training, babelcap.pipelines
result["heavy_at_import"] = sorted(m for m in ("torch", "apache_beam") if m in sys.modules)
import babelcap.core.schema, babelcap.translators
result["file"] = babelcap.__file__
result["languages"] = len(babelcap.translators.known_languages())
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        result["missing"][name] = exc.name
print(json.dumps(result))
"""


def test_installs_into_a_fresh_venv_as_babelcap_only(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    proc = subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert (venv / ("Scripts/babelcap.exe" if os.name == "nt" else "bin/babelcap")).exists()

    # babelcap comes from the wheel alone; its dependencies (pyarrow, ...) are borrowed from the
    # test's environment through a path line, which only appends those folders to sys.path (a
    # .pth there, such as this checkout's editable finder, is not run).
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "zz_test_dependencies.pth").write_text("\n".join(here) + "\n")

    elsewhere = tmp_path / "elsewhere"  # a working directory outside the repository
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    proc = subprocess.run(
        [str(python), "-c", CHECK, *NOT_TOP_LEVEL],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(venv.resolve()), result["file"]
    assert result["languages"] > 0  # languages.json came with it
    assert result["missing"] == {name: name for name in NOT_TOP_LEVEL}, result["missing"]
    assert result["heavy_at_import"] == [], (
        "importing babelcap.training / babelcap.pipelines pulled in "
        f"{result['heavy_at_import']} (their __init__ must stay light)"
    )
