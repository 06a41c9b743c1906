"""Report: markdown table, JSON, label-efficiency plot and retrieval grid (valid PNGs, correct colours)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ssl_hybrid.data.labeled import load_labeled
from ssl_hybrid.eval.report import CORRECT, WRONG, build_report, retrieval_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _valid_png(path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_MAGIC
    Image.open(path).verify()
    return Image.open(path).convert("RGB")


@pytest.mark.slow
def test_report_compares_backbones_and_writes_valid_files(labeled_pair, tmp_path):
    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    out = tmp_path / "report"
    report = build_report(["random:resnet10t", "random:hybrid_nano"], train, test, out, names=["resnet", "hybrid"],
                          shots=(1, 2), seeds=2, image_size=32, batch_size=16, grid_queries=4)
    assert [e["name"] for e in report["entries"]] == ["resnet", "hybrid"]
    table = (out / "report.md").read_text()
    assert "| resnet |" in table and "| hybrid |" in table and "knn 2-shot" in table and "linear 1-shot" in table
    saved = json.loads((out / "report.json").read_text())
    assert saved["entries"][0]["knn"]["k"] == 20 and len(saved["entries"][1]["fewshot"]) == 4
    plot = _valid_png(out / "label_efficiency.png")
    assert plot.size[0] > 300 and len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 10
    for name in ("resnet", "hybrid"):
        _valid_png(out / f"retrieval_{name}.png")
    assert len(list((out / "splits").glob("shots*_seed*.json"))) == 4


def test_retrieval_grid_borders_are_green_when_right_and_red_when_wrong(labeled_pair, tmp_path):
    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    # Hand-made features: every query's nearest training image is index 0 (class 0), then index 17 (class 2).
    train_features = np.zeros((len(train), 4), dtype=np.float32)
    train_features[:, 3] = 1.0
    train_features[0] = [1, 0, 0, 0]
    train_features[17] = [0.9, 0.1, 0, 0]
    test_features = np.tile(np.array([[1, 0, 0, 0]], dtype=np.float32), (len(test), 1))
    info = retrieval_grid(train, test, train_features, test_features, tmp_path / "grid.png", queries=len(test),
                          neighbours=2, thumb=20, border=3)
    grid = np.asarray(_valid_png(tmp_path / "grid.png"))
    cell, caption = 20 + 6, 14
    picked = np.sort(np.random.default_rng(0).choice(len(test), size=len(test), replace=False))
    for row, query in enumerate(picked):
        label = test.samples[query].label
        y = row * (cell + caption) + 1  # inside the top border band
        first, second = grid[y, cell + 8 + 10], grid[y, 2 * cell + 8 + 10]
        assert tuple(first) == (CORRECT if label == 0 else WRONG)
        assert tuple(second) == (CORRECT if label == 2 else WRONG)
    assert info["neighbour_precision"] == pytest.approx(2 / 6)  # 3 classes x 3 queries, each right once in 2
