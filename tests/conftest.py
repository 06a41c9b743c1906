"""Shared fixtures: a tiny temporary image folder made with PIL, a temporary run directory,
and paths to the real development datasets (tests using them skip cleanly when absent).

Tests leave nothing behind. Every test gets its own ``SSL_HYBRID_CACHE`` under its ``tmp_path`` (the
feature cache and the image-folder shard cache never touch ``~/.cache/ssl_hybrid``). The whole session
runs with ``TMPDIR`` set to one private folder (pytest's ``tmp_path`` folders live there too, and every
subprocess a test starts inherits it); when the session ends, anything else left in that folder fails the
run and is listed, and the folder is removed when the run passed (kept for inspection when it did not).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = Path(os.environ.get("SSL_HYBRID_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
SESSION_TMP_PREFIX = "ssl_hybrid_tests_"
TORCH_CACHE = "torchinductor"
_SESSION_TMP = pytest.StashKey[Path]()
_LEFT = pytest.StashKey[list]()

# The benchmark scripts (benchmarks/bench_*.py, timing.py) import each other as siblings, as they do when run
# as ``python benchmarks/<x>.py``; tests import them the same way.
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def pytest_configure(config):
    root = Path(tempfile.mkdtemp(prefix=SESSION_TMP_PREFIX))
    config.stash[_SESSION_TMP] = root
    os.environ["TMPDIR"] = str(root)
    os.environ["SSL_HYBRID_CACHE"] = str(root / "cache")  # code run outside a test (collection) too
    # torch creates its compile cache (<tmp>/torchinductor_<user>) when timm imports torch._dynamo; keep it
    # in the session folder under a known name, so it goes when the folder goes.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / TORCH_CACHE)
    tempfile.tempdir = None  # forget the cached system temp dir; pytest's basetemp is created lazily


def leftovers(root: Path) -> list[str]:
    """What the session left in its temp folder besides pytest's own tmp_path tree, an empty session cache
    and what third-party tools always leave (removed with the folder): torch's compile cache and
    torchrun's log folders (torch.distributed.elastic makes a torchelastic_* folder per launch when no
    --log-dir is given and never removes it)."""
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(("pytest-of-", "torchelastic_")) or entry.name == TORCH_CACHE or (
                entry.name == "cache" and not any(entry.iterdir())) or entry == _live_multiprocessing_dir():
            continue
        found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    root = session.config.stash[_SESSION_TMP]
    left = leftovers(root)
    session.config.stash[_LEFT] = left
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif exitstatus == 0 and _live_multiprocessing_dir() is None:
        shutil.rmtree(root, ignore_errors=True)
    elif exitstatus == 0:  # multiprocessing removes its folder (inside ours) at exit: remove ours after it
        from multiprocessing import util

        util.Finalize(None, shutil.rmtree, args=(str(root),), kwargs={"ignore_errors": True}, exitpriority=-1000)


def _live_multiprocessing_dir():
    """This process's multiprocessing temp folder (pymp-*), which multiprocessing itself removes at exit."""
    from multiprocessing import process

    tempdir = getattr(process.current_process(), "_config", {}).get("tempdir")
    return Path(tempdir) if tempdir and Path(tempdir).exists() else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left, root = config.stash.get(_LEFT, []), config.stash[_SESSION_TMP]
    if left:
        terminalreporter.write_line(f"tests left behind in the temp folder {root}: {', '.join(left)} "
                                    "(a test or the code it runs does not clean up)", red=True)
    elif root.exists() and exitstatus != 0:
        terminalreporter.write_line(f"temp files of the failed tests are kept in {root}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch):
    """Never read or write the user's ~/.cache/ssl_hybrid (subprocesses inherit the variable)."""
    monkeypatch.setenv("SSL_HYBRID_CACHE", str(tmp_path / "cache"))


def _make_image(path: Path, rng: np.random.Generator, size: tuple[int, int], class_index: int) -> None:
    from PIL import Image

    height, width = size
    # Class-dependent colour + noise, so classes are separable but images are not identical.
    base = np.array([(class_index * 70) % 256, (class_index * 130 + 40) % 256, (class_index * 200 + 90) % 256])
    pixels = np.clip(base + rng.normal(0, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 6 images (64x48 JPEG/PNG mixed) in class sub-folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for class_index, name in enumerate(["alpha", "beta", "gamma"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            suffix = ".png" if i % 3 == 0 else ".jpg"
            _make_image(folder / f"{name}_{i}{suffix}", rng, (48, 64), class_index)
    return root


@pytest.fixture
def flat_image_folder(tmp_path: Path) -> Path:
    """10 unlabeled JPEG images in one folder."""
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(10):
        _make_image(root / f"img_{i:03d}.jpg", rng, (40 + i, 56), i % 4)
    return root


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """A temporary train.output_dir."""
    path = tmp_path / "runs"
    path.mkdir()
    return path


def shared_dataset(name: str) -> Path:
    """Path to ../shared/datasets/<name>, or skip the test cleanly when it is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"development dataset '{name}' not available (set SSL_HYBRID_DATASETS to the folder holding it)")
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (mixed precision, device); tests that build Accelerators
    with different settings in one pytest process must not see each other's state."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def free_port() -> int:
    """A TCP port free right now, so torchrun tests don't collide when suites run side by side."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
