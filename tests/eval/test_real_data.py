"""Every evaluator on real images: 4 classes of flowers12 with a random hybrid_nano at 32 px.

Skipped cleanly when the development dataset is absent. Random features of real photos still carry
colour and texture, so each evaluator must land clearly above chance (25%)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ssl_hybrid.data.labeled import LabeledSet, Sample, load_labeled
from ssl_hybrid.eval.features import features_for_spec
from ssl_hybrid.eval.fewshot import fewshot_evaluate
from ssl_hybrid.eval.knn import knn_evaluate
from ssl_hybrid.eval.linear import linear_probe
from tests.eval.eval_helpers import shared_dataset

CLASSES = ["buttercup", "daisy", "iris", "sunflower"]


def _few_classes(labeled: LabeledSet, per_class: int) -> LabeledSet:
    keep = {labeled.classes.index(name): i for i, name in enumerate(CLASSES)}
    samples, seen = [], {}
    for s in labeled.samples:
        if s.label in keep and seen.get(s.label, 0) < per_class:
            seen[s.label] = seen.get(s.label, 0) + 1
            samples.append(Sample(s.id, keep[s.label], s.path, s.offset, s.size))
    return LabeledSet(labeled.source, list(CLASSES), samples)


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = shared_dataset("flowers12")
    train = _few_classes(load_labeled(root / "train"), 30)
    test = _few_classes(load_labeled(root / "test"), 10)
    cache = tmp_path_factory.mktemp("cache")
    meta, [(train_f, train_y), (test_f, test_y)] = features_for_spec("random:hybrid_nano", [train, test], 32, 40,
                                                                    cache_dir=cache)
    return train, test, train_f, train_y, test_f, test_y, cache


def test_knn_linear_and_fewshot_on_flowers(flowers, tmp_path):
    train, test, train_f, train_y, test_f, test_y, _ = flowers
    assert train_f.shape[0] == 120 and test_f.shape[0] == 40
    knn = knn_evaluate(train_f, train_y, test_f, test_y, num_classes=4)
    linear = linear_probe(train_f, train_y, test_f, test_y, num_classes=4)
    assert knn["top1"] > 0.4 and linear["top1"] > 0.4, (knn["top1"], linear["top1"])
    fewshot = fewshot_evaluate(train_f, train_y, test_f, test_y, shots=(1, 5), seeds=2, train_set=train,
                               split_dir=tmp_path, num_classes=4)
    by_key = {(r["method"], r["shots"]): r for r in fewshot["results"]}
    assert by_key[("knn", 5)]["mean"] > 0.3
    split = json.loads((tmp_path / "shots5_seed1.json").read_text())
    assert len(split["ids"]) == 20 and all(i.split("/")[0] in CLASSES for i in split["ids"])


@pytest.mark.slow
def test_finetune_on_flowers(flowers):
    from ssl_hybrid.eval.backbones import load_backbone_spec
    from ssl_hybrid.eval.finetune import FinetuneSettings, finetune

    train, test = flowers[0], flowers[1]
    model, _ = load_backbone_spec("random:hybrid_nano", image_size=32)
    result = finetune(model, train, test, 32, FinetuneSettings(epochs=3, batch_size=16, lr=2e-3, patience=3))
    assert result["n_test"] == 40 and 0.0 <= result["top1"] <= 1.0
    assert np.isfinite([h["loss"] for h in result["history"]]).all()


def test_report_on_flowers(flowers, tmp_path):
    from PIL import Image

    from ssl_hybrid.eval.report import build_report

    train, test, cache = flowers[0], flowers[1], flowers[-1]
    report = build_report(["random:hybrid_nano"], train, test, tmp_path, shots=(1, 5), seeds=2, image_size=32,
                          batch_size=40, cache_dir=cache, grid_queries=4)  # features come from the cache
    entry = report["entries"][0]
    assert entry["knn"]["n_train"] == 120 and {r["shots"] for r in entry["fewshot"]} == {1, 5}
    for png in ("label_efficiency.png", "retrieval_random_hybrid_nano.png"):
        Image.open(tmp_path / png).verify()
    assert "| random_hybrid_nano |" in (tmp_path / "report.md").read_text()
