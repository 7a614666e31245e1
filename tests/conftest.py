"""Shared fixtures: one small built world (and its models) per test session.

The world and its models are cached under `.cache/test-world` (keyed by the world's
parameters, and per model by configuration through the models' build stamps), so a second
`make test` reuses them; a fresh clone builds them once. `make test` passes
`--build-world-models`: the models the suite needs are then built in a background process
group, in parallel (one process per core), while the tests that need none run; a test that
needs a model still building waits for it (the per-model build lock). `make test` also runs the
test files on pytest-xdist workers, one per core (whole files, in the order below): most tests
drive one Python process at a time (a pipeline, a CLI, torchrun), so one file alone leaves
cores idle once the builds are done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _worker_cores() -> int:
    """This process's share of the cores: all of them, or its part under pytest-xdist."""
    from babelcap.core.devices import available_cores

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, available_cores() // workers)


# An xdist worker's share of the cores, for every process it starts (CLIs, torchrun ranks, Beam
# workers, open_clip's trainer): torch in each would otherwise take all the cores, and OpenMP
# threads beyond the cores spin against the other worker and the builds (open_clip_train took
# 53 CPU-seconds beside them instead of 18).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(_worker_cores()))


# The world models the suite uses, two building at a time: the demo's first (the captioner, the
# longest, beside `m2m-multi`), then clip-base (most tests need it), then the ones only a few
# files need. Built last, `m2m-multi` kept the demo test waiting until every other file was
# done, and it then ran alone on one core for its last 1.5 minutes.
SUITE_MODELS = ("captioner", "m2m-multi", "clip-base", "marian-en-pt", "m2m-pt-en")
_background: subprocess.Popen | None = None


def _cache_root() -> Path:
    return Path(os.environ.get("BABELCAP_TEST_CACHE", REPO / ".cache"))


def _test_world() -> Path:
    from babelcap.world.build import TEST_WORLD, ensure_world
    from babelcap.world.models import _locked

    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / "test-world.lock"):  # sessions started together build it once
        return ensure_world(root / "test-world", progress=False, **TEST_WORLD)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--build-world-models",
        action="store_true",
        help="build the test world's models in the background, in parallel (make test)",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    global _background
    config = session.config
    wanted = config.getoption("build_world_models") and not config.option.collectonly
    if not wanted or hasattr(config, "workerinput"):  # xdist workers: the controller builds
        return
    world = _test_world()
    (world / "models").mkdir(exist_ok=True)
    with open(world / "models" / "background-build.log", "w") as log:
        _background = subprocess.Popen(
            [sys.executable, "-c", _BUILD_SCRIPT, str(world), *SUITE_MODELS],
            # A lone model left to build is built in that process: on one thread, as the pool's
            # are, since the tests run beside it (on every core, a Marian rebuild took 490
            # CPU-seconds instead of 70).
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: ended with its pool at the end
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # While the models build, run first the test files that need none (whole files moved, so
    # module fixtures are set up once; otherwise the order is pytest's).
    if not config.getoption("build_world_models"):
        return
    needs = {
        item.module
        for item in items
        if "world_models" in getattr(item, "fixturenames", ())
        or item.get_closest_marker("world_models")  # asks for them at run time
    }
    items.sort(key=lambda item: getattr(item, "module", None) in needs)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # More torch threads than cores makes OpenMP workers spin against each other (a build beside
    # a 2-thread process ran several times slower). So while the background builds hold the
    # cores (one thread each), a test runs on one thread; with pytest-xdist (`make test`), each
    # worker on its share of the cores; otherwise on all of them.
    if "torch" not in sys.modules:
        return
    import torch

    building = _background is not None and _background.poll() is None
    torch.set_num_threads(1 if building else _worker_cores())


_BUILD_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from babelcap.world.models.parallel import build_models_parallel
build_models_parallel(sys.argv[1], only=sys.argv[2:])
"""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The suite ended first (-x, -k): the models left half built are rebuilt next time.
    if _background is not None and _background.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
            os.killpg(_background.pid, signal.SIGTERM)
        _background.wait(timeout=60)


@pytest.fixture(scope="session")
def world_dir() -> Path:
    """A small built world (same parameters every session, rebuilt only when they change)."""
    return _test_world()


@pytest.fixture(scope="session")
def world_models(world_dir: Path):
    """Build (or reuse) the world's models; call with the names a test needs."""
    from babelcap.world.models import model_dir
    from babelcap.world.models.parallel import build_models_parallel

    def build(*names: str) -> dict[str, Path]:
        build_models_parallel(world_dir, only=list(names))  # independent ones at once
        return {name: model_dir(world_dir, name) for name in names}

    return build
