"""`ssl-hybrid shards` end to end and its errors; `ssl-hybrid bench data` smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_hybrid.cli import main
from ssl_hybrid.data.sources import resolve_shards


def test_shards_command_end_to_end(image_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli_out"
    code = main(["-q", "shards", "--src", str(image_folder), "--out", str(out), "--shard-size", "5",
                 "--max-side", "40", "--workers", "2", "--seed", "1", "--prefix", "demo"])
    assert code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"{out}: 18 samples in 4 shards, 3 classes, 0 skipped"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"demo-{i:06d}.tar" for i in range(4)]
    assert manifest["max_side"] == 40 and manifest["seed"] == 1
    assert len(resolve_shards(str(out))) == 4


@pytest.mark.parametrize("argv,message", [
    (["shards", "--out", "x"], "--src is required"),
    (["shards", "--src", "x"], "--out is required"),
    (["shards", "--src", "/nonexistent/images", "--out", "x"], "source not found"),
    (["shards", "--src", "{src}", "--out", "{out}", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["shards", "--src", "{src}", "--out", "{out}", "--labels", "folders"], "not inside a class folder"),
])
def test_shards_command_errors_are_one_line_exit_2(argv, message, flat_image_folder: Path, tmp_path: Path, capsys):
    argv = [a.format(src=flat_image_folder, out=tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ssl-hybrid shards: error:") and message in err


@pytest.mark.slow
def test_shards_entry_point_missing_src_subprocess():
    result = subprocess.run([sys.executable, "-m", "ssl_hybrid", "shards", "--out", "x"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["ssl-hybrid shards: error: --src is required "
                                                  "(see ssl-hybrid shards --help)"]


@pytest.mark.slow
def test_bench_data_smoke(good_shards: Path, tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "data", "--out", str(out), "--shards", str(good_shards), "--workers", "0,1",
                 "--samples", "6", "--batch-size", "3", "--image-size", "32", "--repeats", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "data" and result["corpus_samples"] == 24
    assert [r["workers"] for r in result["results"]] == [0, 1]
    for row in result["results"]:
        assert row["stream_samples_per_s"] > 0 and row["raw_samples_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["stream_samples_per_s"] / row["raw_samples_per_s"], rel=1e-2)
    assert {"platform", "cpu_count", "torch"} <= set(result["machine"])
