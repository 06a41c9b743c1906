"""`python benchmarks/bench_train.py`'s JSON from given timings: the ratios, and measurements only (no targets)."""

from __future__ import annotations

import argparse

import bench_train as bench
import pytest

from ssl_hybrid.config import load_config


def test_summary_keeps_the_best_repeat_and_carries_no_targets(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--steps", "4", "--repeats", "2"])
    samples = {"loop": [{"img_per_s": 8.0, "steps": 4}, {"img_per_s": 9.0, "steps": 4}],
               "bare_joint": [{"img_per_s": 10.0, "step_seconds": 1.6, "steps": 4},
                              {"img_per_s": 8.0, "step_seconds": 2.0, "steps": 4}],
               "bare_dino": [{"img_per_s": 20.0, "step_seconds": 0.8, "steps": 4}]}
    result = bench.summarize(args, load_config(None, [f"train.output_dir={tmp_path}"]), samples)
    assert result["loop_overhead"] == pytest.approx(0.1)  # best loop 9 img/s vs best bare 10 img/s
    assert result["joint_vs_dino_time_ratio"] == pytest.approx(2.0)
    assert result["setup"]["timed_steps"] == 4 and result["machine"]["cpu_count"] >= 1
    assert not [key for key in result if "target" in key or key.endswith(("_ok", "_met"))]  # targets: README


def test_bench_configs_load_on_the_default_recipe(tmp_path):
    """The default recipe (quickstart: SimCLR with the multiscale embedding) once made every measurement fail
    to load: the bench times MIM + DINO and DINO-only, for which that embedding is an error."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    joint = bench.bench_config(args, tmp_path, mim_weight=1.0, dino_weight=1.0, simclr_weight=0.0)
    dino = bench.bench_config(args, tmp_path, mim_weight=0.0, dino_weight=1.0, simclr_weight=0.0)
    assert joint.objective.embedding == dino.objective.embedding == "default"
    assert joint.data.views == dino.data.views == "dino"
    assert joint.data.num_local_views == dino.data.num_local_views == 0  # the recipe's multi-crop is not timed
    assert (joint.objective.mim_weight, dino.objective.mim_weight) == (1.0, 0.0) and joint.model.name == "hybrid_tiny"
