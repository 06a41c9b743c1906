"""The backbone benchmark runs end to end on a tiny configuration and reports every section."""

from __future__ import annotations

import json

from ssl_hybrid.cli import main


def test_bench_backbone_cli_writes_all_sections(tmp_path, capsys):
    out = tmp_path / "backbone.json"
    code = main(["-q", "bench", "backbone", "--out", str(out), "--models", "hybrid_nano", "--variant", "hybrid_nano",
                 "--iters", "1", "--warmup", "0", "--batch-size", "2", "--img-size", "32", "--threads", "1",
                 "--extra-threads", "2"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] >= 1 and "torch" in result["machine"]
    row = result["models"][0]
    assert row["model"] == "hybrid_nano" and row["img_per_s"] > 0 and 0 < row["utilization"] < 1.5
    assert result["masked"]["train_gflops_per_img"]["masked"] < result["masked"]["train_gflops_per_img"]["unmasked"]
    sides = result["selection"]["sides"]
    assert sides["none"]["tokens_kept_mean"] == 4 and sides["fixed"]["tokens_kept_mean"] < 4
    assert "targets" not in result  # measurements only; the targets are in the README
    assert set(result["ratios_at_other_thread_counts"]["2"]) == {"masked", "selection"}
