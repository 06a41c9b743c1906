"""k-NN: FAISS search + exp(sim/T) voting against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from eval_helpers import clustered, knn_reference_numpy

from ssl_hybrid.eval.knn import faiss_threads, knn_evaluate, knn_predict, topk_accuracy, vote


@pytest.mark.parametrize("k", [1, 5, 20, 64])
def test_knn_predict_matches_bruteforce_numpy(k):
    bank, bank_labels = clustered(300, 7, 32, seed=0, noise=2.0)
    queries, _ = clustered(120, 7, 32, seed=1, noise=2.0)
    scores = knn_predict(bank, bank_labels, queries, k=k, temperature=0.07, num_classes=7)
    reference = knn_reference_numpy(bank, bank_labels, queries, k=k, temperature=0.07, num_classes=7)
    assert scores.shape == (120, 7)
    np.testing.assert_array_equal(scores.argmax(1), reference.argmax(1))
    np.testing.assert_allclose(scores, reference, rtol=1e-4)


def test_vote_weights_each_neighbour_by_exp_sim_over_t():
    sims = np.array([[0.9, 0.5, 0.4]])
    labels = np.array([[1, 0, 0]])
    scores = vote(sims, labels, num_classes=3, temperature=0.1)
    np.testing.assert_allclose(scores[0], [np.exp(5) + np.exp(4), np.exp(9), 0.0])


def test_knn_is_invariant_to_feature_scale():
    bank, bank_labels = clustered(200, 5, 16, seed=2)
    queries, _ = clustered(50, 5, 16, seed=3)
    a = knn_predict(bank, bank_labels, queries, k=10)
    b = knn_predict(bank * 37.0, bank_labels, queries * 0.01, k=10)
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_knn_evaluate_reports_every_k_from_one_search():
    bank, bank_labels = clustered(400, 6, 24, seed=4, noise=1.5)
    queries, query_labels = clustered(100, 6, 24, seed=5, noise=1.5)
    result = knn_evaluate(bank, bank_labels, queries, query_labels, threads=1)
    assert set(result) >= {"top1", "top5", "k", "temperature", "n_train", "n_test", "seconds", "per_k"}
    assert result["k"] == 20 and result["temperature"] == 0.07
    assert (result["n_train"], result["n_test"]) == (400, 100)
    for k in (10, 20, 100, 200):
        expected = knn_reference_numpy(bank, bank_labels, queries, k=k, num_classes=6)
        assert result["per_k"][str(k)]["top1"] == pytest.approx(float((expected.argmax(1) == query_labels).mean()))
    assert result["top1"] == result["per_k"]["20"]["top1"]
    assert 0.5 < result["top1"] <= result["top5"] <= 1.0


def test_k_larger_than_bank_is_capped():
    bank, bank_labels = clustered(15, 3, 8, seed=6)
    queries, query_labels = clustered(10, 3, 8, seed=7)
    result = knn_evaluate(bank, bank_labels, queries, query_labels)
    assert result["per_k"]["200"]["k_used"] == 15


def test_topk_accuracy():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0


def test_faiss_threads_are_set_explicitly_and_restored():
    import faiss
    import torch

    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    with faiss_threads(1) as threads:
        assert threads == 1 and faiss.omp_get_max_threads() == 1
    assert (faiss.omp_get_max_threads(), torch.get_num_threads()) == before


def test_topk_accuracy_equals_the_stable_sort_definition_with_ties():
    rng = np.random.default_rng(9)
    scores = rng.integers(0, 4, size=(300, 6)).astype(float)  # many ties
    labels = rng.integers(0, 6, 300)
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in (1, 2, 5):
        expected = float((order[:, :k] == labels[:, None]).any(axis=1).mean())
        assert topk_accuracy(scores, labels, k) == pytest.approx(expected)
