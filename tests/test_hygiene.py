"""Tests leave nothing behind: a private cache per test, a private temp folder per session that must be
empty at the end (tests/conftest.py), and a check that a suite run that leaks is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _root_conftest():
    """tests/conftest.py loaded by path: a plain `import conftest` may find another folder's conftest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ssl_hybrid_root_conftest", REPO_ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SESSION_TMP_PREFIX = _root_conftest().SESSION_TMP_PREFIX


def test_each_test_has_its_own_cache(tmp_path):
    from ssl_hybrid.data.shards import cache_root
    from ssl_hybrid.eval.features import default_cache_dir

    assert Path(os.environ["SSL_HYBRID_CACHE"]) == tmp_path / "cache"
    assert cache_root().is_relative_to(tmp_path) and default_cache_dir().is_relative_to(tmp_path)


def test_the_session_writes_temp_files_in_its_own_folder(tmp_path):
    session = Path(tempfile.gettempdir())
    assert session.name.startswith(SESSION_TMP_PREFIX) and os.environ["TMPDIR"] == str(session)
    assert tmp_path.is_relative_to(session)


CLEAN = '''
import os, subprocess, sys, tempfile
from pathlib import Path

def test_uses_the_cache_and_temp_files(tmp_path):
    from ssl_hybrid.data.shards import cache_root, shards_for_image_folder
    from PIL import Image
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    assert (shards_for_image_folder(tmp_path / "imgs") / "manifest.json").exists()
    assert cache_root().is_relative_to(tmp_path)
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "x").write_text("x")
    code = "import os, pathlib; p = pathlib.Path(os.environ['SSL_HYBRID_CACHE']); p.mkdir(parents=True, exist_ok=True); (p / 'f').write_text('x')"
    subprocess.run([sys.executable, "-c", code], check=True)
'''
LEAKY = CLEAN + '''

def test_forgets_a_temp_folder():
    tempfile.mkdtemp(prefix="forgotten_")
'''


def _run_inner_suite(tmp_path: Path, tests: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run a small suite under a copy of tests/conftest.py with a fake HOME and an empty system temp dir."""
    suite, home, temp = tmp_path / "suite" / "tests", tmp_path / "home", tmp_path / "temp"
    for folder in (suite, home, temp):
        folder.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "tests" / "conftest.py", suite / "conftest.py")
    (suite / "test_inner.py").write_text(tests)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SSL_HYBRID_CACHE", "PYTEST_ADDOPTS", "TORCHINDUCTOR_CACHE_DIR")}
    env.update(HOME=str(home), TMPDIR=str(temp), PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                            cwd=suite.parent, env=env, capture_output=True, text=True, timeout=300)
    return result, home, temp


@pytest.mark.slow
def test_a_clean_suite_leaves_an_empty_temp_dir_and_no_user_cache(tmp_path):
    result, home, temp = _run_inner_suite(tmp_path, CLEAN)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert list(temp.iterdir()) == []
    assert not (home / ".cache" / "ssl_hybrid").exists()


@pytest.mark.slow
def test_a_suite_that_leaks_a_temp_folder_fails_and_names_it(tmp_path):
    result, _, temp = _run_inner_suite(tmp_path, LEAKY)
    assert result.returncode == 1 and "2 passed" in result.stdout
    assert "tests left behind in the temp folder" in result.stdout and "forgotten_" in result.stdout
    kept = list(temp.iterdir())  # kept for inspection
    assert len(kept) == 1 and kept[0].name.startswith(SESSION_TMP_PREFIX)
    shutil.rmtree(kept[0])



def _imported_modules(source: str, package: str) -> set[str]:
    """Every module a file of ``package`` imports, at its top or inside a function (relative names resolved)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_evaluation_imports_nothing_from_training():
    """Evaluation stands alone: what it shares with pretraining (schedules, data, models) lives below both, so
    a change to the trainer cannot change how an evaluation number is computed."""
    found = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in sorted((REPO_ROOT / "ssl_hybrid" / "eval").rglob("*.py"))
        for name in sorted(_imported_modules(path.read_text(encoding="utf-8"), "ssl_hybrid.eval"))
        if name == "ssl_hybrid.train" or name.startswith("ssl_hybrid.train.")
    ]
    assert not found, "\n".join(found)


def test_the_import_scan_sees_function_level_and_relative_imports():
    source = "def f():\n    from ..train import loop\n    import ssl_hybrid.train.schedules\n"
    assert {"ssl_hybrid.train.loop", "ssl_hybrid.train.schedules"} <= _imported_modules(source, "ssl_hybrid.eval")
