"""The backbone benchmark (benchmarks/bench_models.py) runs end to end on a tiny configuration and reports every
section."""

from __future__ import annotations

import argparse
import json

import bench_models as bench
import pytest
import timing


@pytest.mark.slow
def test_bench_backbone_cli_writes_all_sections(tmp_path, capsys):
    out = tmp_path / "backbone.json"
    timing.main(bench, ["-q", "--out", str(out), "--models", "hybrid_nano", "--variant", "hybrid_nano",
                        "--iters", "1", "--warmup", "0", "--batch-size", "2", "--img-size", "32", "--threads", "1",
                        "--extra-threads", "2"])
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] >= 1 and "torch" in result["machine"]
    row = result["models"][0]
    assert row["model"] == "hybrid_nano" and row["img_per_s"] > 0 and 0 < row["utilization"] < 1.5
    assert result["masked"]["train_gflops_per_img"]["masked"] < result["masked"]["train_gflops_per_img"]["unmasked"]
    sides = result["selection"]["sides"]
    assert sides["none"]["tokens_kept_mean"] == 4 and sides["fixed"]["tokens_kept_mean"] < 4
    assert "targets" not in result  # measurements only; the targets are in the README
    assert set(result["ratios_at_other_thread_counts"]["2"]) == {"masked", "selection"}


@pytest.mark.fault(injected="other processes slow the timed train step 10^6 x more than the short GEMM beside it "
                            "(a loaded machine; the smoke-size utilization is ~1% even when idle)",
                   did="every rate and ratio is kept to 3 significant digits, so a positive measurement stays "
                       "positive (fixed decimals rounded the utilization to 0.0)",
                   lost="nothing")
def test_throughput_row_stays_positive_when_the_step_is_slowed_by_load(monkeypatch):
    def loaded(sides, iters, warmup):  # runs each side once, then reports the times of a loaded machine
        for fn in sides.values():
            fn()
        return {"step": {"wall": [20.0], "cpu": [10.0]}, "gemm": {"wall": [1e-5], "cpu": [1e-5]}}

    monkeypatch.setattr(bench, "time_alternating", loaded)
    args = argparse.Namespace(img_size=32, batch_size=2, device="cpu", precision="fp32", gemm_size=64,
                              iters=1, warmup=0)
    row = bench.bench_models(["hybrid_nano"], args)[0]
    numbers = ("img_per_s", "step_s", "train_gflops_per_img", "achieved_gflop_per_s", "gemm_peak_gflop_per_s",
               "utilization", "utilization_cpu_time")
    assert all(row[key] > 0 for key in numbers), {key: row[key] for key in numbers}
    assert row["utilization"] == pytest.approx(row["achieved_gflop_per_s"] / row["gemm_peak_gflop_per_s"], rel=1e-2)


@pytest.mark.slow  # builds and times a model per section: seconds
def test_bench_family_compares_every_feature_against_the_same_model_without(tmp_path):
    import bench_family

    out = tmp_path / "family.json"
    timing.main(bench_family, ["-q", "--out", str(out), "--model", "resvit_nano", "--sizes", "64", "--attn-size", "64",
                               "--window-size", "2", "--topk", "5", "--iters", "1", "--warmup", "0",
                               "--batch-size", "2", "--threads", "1"])
    result = json.loads(out.read_text())
    sides = result["selection"]["sizes"]["64"]["sides"]
    assert sides["none"]["tokens_kept_mean"] == 16 and sides["fixed"]["tokens_kept_mean"] == 12  # ceil(0.7 * 16)
    assert sides["none"]["train_step"]["speedup"] == 1.0 and sides["fixed"]["inference"]["img_per_s"] > 0
    assert set(result["attention"]["sides"]) == {"global", "window", "topk"}
    assert "load_average_end" in result["machine"]
