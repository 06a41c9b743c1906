"""k-shot evaluation: seeded draws, split ids saved, mean ± std, both protocols."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_hybrid.eval.fewshot import fewshot_evaluate
from tests.eval.eval_helpers import clustered


@pytest.mark.slow
def test_fewshot_is_deterministic_and_saves_split_ids(tmp_path):
    from ssl_hybrid.data.labeled import LabeledSet, Sample

    train, train_y = clustered(120, 4, 16, seed=3, noise=1.5)
    train_y = np.repeat(np.arange(4), 30)
    train = train + np.random.default_rng(0).standard_normal((4, 16))[train_y] * 3
    test_y = np.repeat(np.arange(4), 10)
    test = np.random.default_rng(0).standard_normal((4, 16))[test_y] * 3 + np.random.default_rng(5).standard_normal((40, 16))
    labeled = LabeledSet("mem", list("abcd"), [Sample(f"id{i}", int(y), "x") for i, y in enumerate(train_y)])
    args = dict(shots=(1, 5), seeds=3, methods=("knn", "linear"), train_set=labeled)
    first = fewshot_evaluate(train, train_y, test, test_y, split_dir=tmp_path / "a", **args)
    second = fewshot_evaluate(train, train_y, test, test_y, split_dir=tmp_path / "b", **args)
    assert [(r["method"], r["shots"], r["mean"], r["std"]) for r in first["results"]] == \
           [(r["method"], r["shots"], r["mean"], r["std"]) for r in second["results"]]
    assert [(r["method"], r["shots"]) for r in first["results"]] == [("knn", 1), ("linear", 1), ("knn", 5), ("linear", 5)]
    for row in first["results"]:
        accs = [run["top1"] for run in row["runs"]]
        assert len(accs) == 3 and row["mean"] == pytest.approx(np.mean(accs))
        assert row["std"] == pytest.approx(np.std(accs, ddof=1))
        assert all(run["n_train"] == 4 * row["shots"] for run in row["runs"])
    split = json.loads(Path(first["results"][2]["runs"][1]["split"]).read_text())
    assert split["shots"] == 5 and split["seed"] == 1 and len(split["ids"]) == 20
    assert split == json.loads((tmp_path / "b" / "shots5_seed1.json").read_text()) | {"source": "mem"}
    five_shot_knn = first["results"][2]
    assert five_shot_knn["mean"] > 0.5  # separable clusters: well above the 25% chance level


def test_fewshot_rest_protocol_draws_from_train_and_test_and_scores_every_image_left_out(tmp_path):
    from ssl_hybrid.data.labeled import LabeledSet, Sample, kshot_indices
    from ssl_hybrid.eval.fewshot import evaluate_subset

    centers = np.random.default_rng(0).standard_normal((3, 8)) * 2
    train_y, test_y = np.repeat(np.arange(3), 4), np.repeat(np.arange(3), 2)
    train = centers[train_y] + np.random.default_rng(1).standard_normal((12, 8))
    test = centers[test_y] + np.random.default_rng(2).standard_normal((6, 8))
    train_set = LabeledSet("mem", list("abc"), [Sample(f"tr{i}", int(y), "x") for i, y in enumerate(train_y)])
    test_set = LabeledSet("mem", list("abc"), [Sample(f"te{i}", int(y), "x") for i, y in enumerate(test_y)])
    result = fewshot_evaluate(train, train_y, test, test_y, shots=(2, 5), seeds=3, methods=("knn",),
                              train_set=train_set, test_set=test_set, split_dir=tmp_path, protocol="rest")
    assert result["protocol"] == "rest"
    # 5-shot needs 5 images of each class: only the pool of train (4 per class) and test (2) has them
    five = next(r for r in result["results"] if r["shots"] == 5)
    assert five["n_test"] == 18 - 15 and result["n_test"] == 3
    pool_x, pool_y = np.concatenate([train, test]), np.concatenate([train_y, test_y])
    for row in result["results"]:
        assert row["n_test"] == 18 - 3 * row["shots"]
        for run in row["runs"]:
            drawn = kshot_indices(pool_y, row["shots"], run["seed"])
            rest = np.setdiff1d(np.arange(18), drawn)
            assert run["top1"] == evaluate_subset("knn", pool_x[drawn], pool_y[drawn], pool_x[rest], pool_y[rest],
                                                  3, run["seed"])
            split = json.loads(Path(run["split"]).read_text())
            assert split["ids"] == [f"tr{i}" if i < 12 else f"te{i - 12}" for i in drawn]  # the pool: train, test
            assert split["from"] == ["train" if i < 12 else "test" for i in drawn] and split["protocol"] == "rest"
    assert any(i.startswith("te") for r in result["results"] for run in r["runs"]
               for i in json.loads(Path(run["split"]).read_text())["ids"])
    heldout = fewshot_evaluate(train, train_y, test, test_y, shots=(2,), seeds=3, methods=("knn",))
    assert heldout["protocol"] == "heldout" and heldout["results"][0]["n_test"] == 6
    with pytest.raises(ValueError, match="pass test_set too"):
        fewshot_evaluate(train, train_y, test, test_y, shots=(2,), train_set=train_set, protocol="rest")
    with pytest.raises(ValueError, match="few-shot protocol 'pooled'"):
        fewshot_evaluate(train, train_y, test, test_y, shots=(2,), protocol="pooled")


@pytest.mark.slow
def test_fewshot_draws_evaluated_at_once_give_the_same_numbers_as_in_turn(monkeypatch):
    import ssl_hybrid.eval.fewshot as fewshot

    features, labels = clustered(60, 3, 8, seed=4, noise=2.0)
    args = dict(shots=(2, 5), seeds=4, methods=("knn", "linear"), protocol="rest")
    import joblib

    monkeypatch.setattr(fewshot, "MAX_JOBS", 1)
    in_turn = fewshot_evaluate(features[:40], labels[:40], features[40:], labels[40:], **args)
    jobs = []

    class Spy(joblib.Parallel):
        def __init__(self, n_jobs=None, **kwargs):
            jobs.append(n_jobs)
            super().__init__(n_jobs=n_jobs, **kwargs)

    monkeypatch.setattr(joblib, "Parallel", Spy)
    monkeypatch.setattr(joblib, "cpu_count", lambda only_physical_cores=False: 2)
    monkeypatch.setattr(fewshot, "MAX_JOBS", 2)
    at_once = fewshot_evaluate(features[:40], labels[:40], features[40:], labels[40:], **args)
    assert jobs == [2] * 4  # every (shots, method) ran its draws two at a time
    assert [[run["top1"] for run in r["runs"]] for r in at_once["results"]] == \
           [[run["top1"] for run in r["runs"]] for r in in_turn["results"]]
