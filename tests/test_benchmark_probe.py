"""The objective probe (benchmarks/objective_probe.py) trains for its CPU budget and writes one result line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_hybrid.config import REPO_ROOT


@pytest.mark.slow
def test_objective_probe_trains_for_its_budget_and_reports(image_folder: Path, tmp_path: Path):
    data = tmp_path / "labeled"
    for split in ("train", "test"):
        shutil.copytree(image_folder, data / split)
    results = tmp_path / "results.jsonl"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "objective_probe.py"), "probe", "model.name=hybrid_nano",
               "objective.dino_out_dim=32", "objective.decoder_dim=32", "objective.decoder_depth=1",
               "--minutes", "0.05", "--image-size", "32", "--data", str(data), "--work-dir", str(tmp_path / "work"),
               "--results", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = results.read_text().splitlines()
    result = json.loads(line)
    assert result["name"] == "probe" and result["steps"] >= 1
    assert 0.0 <= result["knn"] <= 100.0 and 0.0 <= result["1shot"] <= 100.0
    assert "10shot" not in result  # 6 images per class cannot make a 10-shot split
    assert set(result["last_losses"]) >= {"mim", "dino"}
    assert not (tmp_path / "work" / "probe").exists()  # the run is removed after evaluation
