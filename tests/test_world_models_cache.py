"""World model caches are keyed on the code that builds them: the builder's module and every
module of the package it imports (transitively, lazy imports included). A change there rebuilds
the model; an unchanged (or comment-only changed) code base reuses it."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from babelcap.world import models as wm
from babelcap.world.build import build_world


@pytest.fixture()
def tiny_world(tmp_path: Path) -> Path:
    out = tmp_path / "world"
    build_world(out, n_images=6, seed=1, languages=("en",), progress=False)
    return out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    st = path.stat()  # a new mtime even within the clock's resolution
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture()
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`fakecap` (standing in for babelcap): a builder module that imports a helper lazily,
    registered as the world model `fake`; every build appends a line to builds.log."""
    root = tmp_path / "src"
    _write(root / "fakecap" / "__init__.py", '"""fake package"""\n')
    _write(
        root / "fakecap" / "builder.py",
        """
        from pathlib import Path

        LOG = Path(__file__).parents[2] / "builds.log"


        def build(world_dir, out_dir, config):
            import time

            from fakecap.helper import VALUE  # a lazy import counts as well

            time.sleep(config.get("sleep", 0))

            with open(LOG, "a") as f:
                f.write(f"{VALUE}\\n")
            return {"value": VALUE}
        """,
    )
    _write(root / "fakecap" / "helper.py", "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(wm, "PACKAGE", "fakecap")
    monkeypatch.setitem(wm.MODELS, "fake", wm.ModelSpec("fake", "fakecap.builder:build"))
    yield root
    for name in [m for m in sys.modules if m == "fakecap" or m.startswith("fakecap.")]:
        del sys.modules[name]


def _builds(tmp_path: Path) -> int:
    log = tmp_path / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_code_modules_follow_imports_transitively() -> None:
    found = wm.code_modules("babelcap.world.models.clip")
    # clip.py imports the trainer inside build(); the trainer imports the image decoder.
    assert {"babelcap.training.trainer", "babelcap.core.images", "babelcap.world"} <= set(found)
    assert all(Path(p).suffix == ".py" for p in found.values())
    assert not any(name.startswith("torch") for name in found)


def test_changed_builder_code_rebuilds_unchanged_reuses(tiny_world, fake_package, tmp_path):
    wm.build_models(tiny_world, only=["fake"])
    assert _builds(tmp_path) == 1
    stamp = wm.build_models(tiny_world, only=["fake"])["fake"]
    assert _builds(tmp_path) == 1  # same world, config and code: reused
    assert stamp["code"] == wm.code_fingerprint("fakecap.builder")

    # Comments and formatting are not code.
    _write(fake_package / "fakecap" / "helper.py", "# the value\nVALUE   =   1\n")
    wm.build_models(tiny_world, only=["fake"])
    assert _builds(tmp_path) == 1

    # A module the builder imports (lazily) changes: rebuilt.
    _write(fake_package / "fakecap" / "helper.py", "VALUE = 2\n")
    assert not wm.is_built(tiny_world, "fake")
    wm.build_models(tiny_world, only=["fake"])
    assert _builds(tmp_path) == 2
    assert wm.is_built(tiny_world, "fake")

    # The builder module itself changes: rebuilt.
    builder = fake_package / "fakecap" / "builder.py"
    _write(builder, builder.read_text() + "\nEXTRA = True\n")
    wm.build_models(tiny_world, only=["fake"])
    assert _builds(tmp_path) == 3


def test_code_fingerprint_is_part_of_the_stamp(tiny_world, fake_package, tmp_path, monkeypatch):
    wm.build_models(tiny_world, only=["fake"])
    monkeypatch.setattr(wm, "code_fingerprint", lambda module: "0" * 16)
    assert not wm.is_built(tiny_world, "fake")
    wm.build_models(tiny_world, only=["fake"])
    wm.build_models(tiny_world, only=["fake"])
    assert _builds(tmp_path) == 2


def test_concurrent_builders_build_once(tiny_world, fake_package, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def build(_):
        return wm.build_models(tiny_world, only=["fake"], overrides={"fake": {"sleep": 0.5}})

    with ThreadPoolExecutor(2) as pool:
        stamps = list(pool.map(build, range(2)))
    assert _builds(tmp_path) == 1  # the second waited for the first, then reused its model
    assert stamps[0]["fake"] == stamps[1]["fake"]
