"""The online k-NN monitor's leave-one-out vote against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_hybrid.eval.knn import leave_one_out_knn


def reference(features, labels, k, temperature):
    normed = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = normed @ normed.T
    np.fill_diagonal(sims, -np.inf)  # a query is never its own neighbour
    correct = 0
    for row in range(len(features)):
        order = np.argsort(-sims[row], kind="stable")[:k]
        votes = np.zeros(labels.max() + 1)
        np.add.at(votes, labels[order], np.exp(sims[row, order] / temperature))
        correct += int(np.argmax(votes) == labels[row])
    return correct / len(features)


def test_leave_one_out_matches_numpy_reference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    features = (rng.normal(size=(60, 16)) + 1.5 * np.eye(16)[labels]).astype(np.float32)
    result = leave_one_out_knn(features, labels, k=5, temperature=0.07)
    assert result["top1"] == pytest.approx(reference(features, labels, 5, 0.07))
    assert result["n_test"] == 60 and result["k"] == 5 and 0.5 < result["top1"] <= 1.0
    duplicates = np.repeat(features[:1], 3, axis=0)  # identical rows: still exactly k others each
    assert leave_one_out_knn(duplicates, np.array([0, 0, 1]), k=2, temperature=0.07)["k"] == 2


def test_monitor_leaves_torchs_thread_count_alone(image_folder, run_root):
    """faiss shares torch's OpenMP runtime: its thread setting must not outlive the monitor's search (it
    once left the rest of a run on 1 thread, so a resumed run, which skips the step-0 monitor, diverged)."""
    import torch

    from ssl_hybrid.config import load_config
    from ssl_hybrid.train.monitor import KNNMonitor
    from ssl_hybrid.train.wiring import build_backbone
    from tests.train.trainhelpers import tiny_overrides

    config = load_config(None, tiny_overrides(run_root, data__val=image_folder, train__knn_every=1))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = KNNMonitor(config).evaluate(build_backbone(config))
        assert torch.get_num_threads() == 2 and result["n_test"] == 18
    finally:
        torch.set_num_threads(before)


@pytest.mark.fault(injected="the quickstart recipe with a new data.train and no data.val (data.val stays the pets corpus)",
                   did="a warning names the corpus the monitor scores and says it is not the training data; every "
                       "online k-NN log line and metrics.jsonl record names the corpus (knn_corpus)",
                   lost="nothing; before, the pets numbers read as the user's own data's")
def test_monitor_names_its_corpus_and_warns_when_it_is_not_the_training_data(image_folder, run_root, caplog):
    from ssl_hybrid.config import load_config
    from ssl_hybrid.train.monitor import KNNMonitor, same_data
    from tests.train.trainhelpers import CORPUS, tiny_overrides

    config = load_config(None, tiny_overrides(run_root, data__val=image_folder, train__knn_every=1))
    assert config.data.train == str(CORPUS)
    with caplog.at_level("INFO", logger="ssl_hybrid.train.monitor"):
        monitor = KNNMonitor(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"scores data.val={image_folder}, not the training data" in warnings[0]
    assert f"data.train={CORPUS}" in warnings[0] and "data.val=" in warnings[0]
    assert monitor.corpus == str(image_folder)  # evaluate() returns it; test_trainer checks it in metrics.jsonl

    caplog.clear()
    same = load_config(None, tiny_overrides(run_root, data__train=image_folder, data__val=image_folder))
    KNNMonitor(same)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert same_data("data/pets37", "./data/pets37/") and not same_data("data/pets37", "data/other")
