"""Linear probe: C chosen on held-out train images, then refit on all of them (checked against sklearn)."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_hybrid.eval.linear import DEFAULT_CS, FALLBACK_C, choose_c, linear_probe
from tests.eval.eval_helpers import clustered


def test_linear_probe_matches_sklearn_refit_with_the_chosen_c():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, train_y = clustered(300, 5, 16, seed=0, noise=2.5)
    test, test_y = clustered(100, 5, 16, seed=1, noise=2.5)
    result = linear_probe(train, train_y, test, test_y)
    assert result["C"] in DEFAULT_CS and set(result["val_accuracy"]) == {repr(c) for c in DEFAULT_CS}
    assert "held-out" in result["selection"]
    best = max(result["val_accuracy"].values())
    assert result["val_accuracy"][repr(result["C"])] == best
    scaler = StandardScaler().fit(train)
    reference = LogisticRegression(C=result["C"], max_iter=1000).fit(scaler.transform(train), train_y)
    accuracy = (reference.predict(scaler.transform(test)) == test_y).mean()
    assert result["top1"] == pytest.approx(accuracy)
    assert result["top1"] > 0.6


def test_one_shot_has_nothing_to_hold_out_and_uses_the_default_c():
    features, labels = clustered(4, 4, 8, seed=2)
    labels = np.arange(4)
    c, accuracy, how = choose_c(features, labels)
    assert c == FALLBACK_C and accuracy == {} and "default" in how
