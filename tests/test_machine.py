"""One machine description for every benchmark JSON: its keys, its torch-free form, and no second copy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ssl_hybrid.machine import cpu_steal, machine_info

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_KEYS = {"platform", "processor", "python", "cpu_count", "load_average", "cpu_steal"}
TORCH_KEYS = {"torch", "threads", "device", "cuda", "gpu"}


def test_cpu_description_has_the_shared_keys():
    import numpy as np
    import torch

    info = machine_info()
    assert set(info) == BASE_KEYS | TORCH_KEYS
    assert info["cpu_count"] == os.cpu_count() and info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads() and info["device"] == "cpu" and info["gpu"] is None
    assert info["processor"]  # platform.machine() where platform.processor() is empty
    assert machine_info(packages=("numpy",))["numpy"] == np.__version__


def test_without_a_device_it_imports_no_torch():
    probe = ("import sys; from ssl_hybrid.machine import machine_info; info = machine_info(device=None); "
             "print(sorted(info), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{sorted(BASE_KEYS)} False"


def test_no_benchmark_describes_the_machine_itself():
    """The fields come from ssl_hybrid.machine only: a bench that calls platform.platform() or
    torch.get_device_name() for its JSON is a second copy whose keys drift (they did: cpus, torch_threads,
    cuda meaning the GPU's name in some files and the CUDA version in others)."""
    twin = re.compile(r"platform\.(platform|processor|python_version)\(|get_device_name\(|get_device_properties\(")
    sources = [*(REPO_ROOT / "ssl_hybrid").rglob("*.py"), *(REPO_ROOT / "benchmarks").glob("*.py")]
    found = [f"{path.relative_to(REPO_ROOT)}:{number}" for path in sources if path.name != "machine.py"
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if twin.search(line)]
    assert not found, "use ssl_hybrid.machine.machine_info: " + ", ".join(found)


def _stat_line(user: int, idle: int, steal: int) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice, then a per-CPU line
    return f"cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


def test_cpu_steal_is_the_stolen_share_of_the_window(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(_stat_line(100, 100, 0))
    # the window: +30 user, +10 idle, +60 steal
    monkeypatch.setattr("ssl_hybrid.machine.time.sleep", lambda s: stat.write_text(_stat_line(130, 110, 60)))
    assert cpu_steal(0.0, stat) == 0.6


def test_cpu_steal_is_none_without_proc_stat(tmp_path):
    assert cpu_steal(0.0, tmp_path / "missing") is None
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert cpu_steal(0.0, tmp_path / "odd") is None


def test_cpu_steal_on_this_machine_is_a_share_or_none():
    steal = cpu_steal(0.05)
    assert steal is None or 0.0 <= steal <= 1.0
