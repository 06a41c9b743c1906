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


@pytest.mark.parametrize("image_size", [64, 96])
@pytest.mark.slow
def test_every_label_efficiency_method_config_loads(tmp_path: Path, image_size: int):
    """Each method's overrides are a valid config at the sizes the benchmark runs (the multi-crop method's local
    crops are half the image size, which must stay a multiple of 16)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_efficiency", REPO_ROOT / "benchmarks" / "label_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(work_dir=tmp_path, train_source="data/pets37", image_size=image_size, batch_size=64,
                              seed=0)
    for method in bench.METHODS:
        config = bench.method_config(method, args, steps=10, name=method, lr=3e-3)
        assert config.model.name == bench.model_of(method) and config.data.image_size == image_size
    multicrop = bench.method_config("resvit_multicrop", args, steps=10, name="m", lr=3e-3)
    assert (multicrop.data.num_local_views, multicrop.data.local_image_size) == (4, image_size // 2)
    assert bench.method_config("ours", args, steps=10, name="o", lr=3e-3).data.num_local_views == 0


@pytest.mark.slow
def test_fewshot_protocol_benchmark_scores_both_protocols_against_random_init(tmp_path: Path):
    out = tmp_path / "fewshot_protocol.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "fewshot_protocol.py"), "random:resnet10t",
               "--heldout-seeds", "2", "--rest-seeds", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["random_init"]["spec"] == "random:resvit_tiny"
    (entry,) = result["pretrained"]
    for protocol, n_test in (("heldout", {"1shot": 111, "5shot": 111}), ("rest", {"1shot": 333, "5shot": 185})):
        rows = entry["protocols"][protocol]
        assert {key: row["n_test"] for key, row in rows.items()} == n_test
        base = result["random_init"]["protocols"][protocol]
        assert all(row["gap"] == pytest.approx(row["mean"] - base[key]["mean"]) for key, row in rows.items())
        assert all(row["seeds"] == 2 for row in rows.values())
