"""Few-label fine-tuning: layer-wise lr decay from group_matcher, early stopping, test accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_hybrid.data.labeled import load_labeled
from ssl_hybrid.eval.backbones import load_backbone_spec
from ssl_hybrid.eval.finetune import Classifier, FinetuneSettings, finetune, layer_decay_param_groups, lr_scheduler


def test_layer_decay_gives_deeper_layers_larger_lrs():
    model, _ = load_backbone_spec("random:hybrid_nano", image_size=32)
    classifier = Classifier(model, 5)
    settings = FinetuneSettings(lr=1e-3, layer_decay=0.5)
    groups = layer_decay_param_groups(classifier, settings)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in classifier.parameters())  # every parameter optimized once
    assert lr_of[id(classifier.head.weight)] == 1e-3
    stem = next(p for n, p in model.named_parameters() if n.startswith("stem"))
    first_block = next(p for n, p in model.named_parameters() if n.startswith("blocks.0."))
    last_block = next(p for n, p in reversed(list(model.named_parameters())) if n.startswith("blocks."))
    assert lr_of[id(stem)] < lr_of[id(first_block)] < lr_of[id(last_block)] < 1e-3
    assert lr_of[id(last_block)] == pytest.approx(1e-3 * 0.5)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert any(p is classifier.head.bias for g in no_decay for p in g["params"])


def test_schedule_warms_up_from_zero_then_cosine_to_zero_per_group():
    head, body = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [head], "lr": 1e-3}, {"params": [body], "lr": 2.5e-4}])
    scheduler = lr_scheduler(optimizer, total_steps=20, warmup_fraction=0.1)
    seen = []
    for _ in range(20):  # the lr each optimizer step uses, then the scheduler steps (as _train_epoch)
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    seen = np.array(seen)
    expected = np.concatenate([[0.0, 0.5], 0.5 * (1 + np.cos(np.pi * np.arange(18) / 17))])
    np.testing.assert_allclose(seen[:, 0], 1e-3 * expected, atol=1e-15)
    np.testing.assert_allclose(seen[:, 1], 2.5e-4 * expected, atol=1e-15)
    assert seen[2, 0] == pytest.approx(1e-3)  # the peak right after the 2 warm-up steps
    assert optimizer.param_groups[0]["lr"] == 0.0  # one step past the end holds the last value


@pytest.mark.slow
def test_finetune_learns_and_early_stops(labeled_pair):
    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    model, _ = load_backbone_spec("random:resnet10t", image_size=32)
    result = finetune(model, train, test, 32, FinetuneSettings(epochs=8, batch_size=8, lr=3e-3, patience=8))
    assert set(result) >= {"top1", "top5", "best_epoch", "val_top1", "epochs_run", "history"}
    assert result["n_train"] + result["n_val"] == 18 and result["n_test"] == 9
    assert result["top1"] > 1 / 3  # colour classes are easy: better than chance after a few epochs
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]

    frozen, _ = load_backbone_spec("random:resnet10t", image_size=32)
    stalled = finetune(frozen, train, test, 32, FinetuneSettings(epochs=10, batch_size=8, lr=0.0, patience=2))
    assert stalled["epochs_run"] == 3 and stalled["best_epoch"] == 0  # lr 0: val never improves after epoch 0


def test_the_saved_model_records_its_base_not_the_last_epoch(labeled_pair, tmp_path):
    """``record`` (what the backbone was) reaches the saved folder's config.json; the epoch loop must not rebind it."""
    import json

    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    model, _ = load_backbone_spec("random:resnet10t", image_size=32)
    result = finetune(model, train, test, 32, FinetuneSettings(epochs=1, batch_size=8), save_dir=tmp_path / "ft",
                      record={"base_model": "runs/base", "steps": 7})
    saved = json.loads((tmp_path / "ft" / "config.json").read_text(encoding="utf-8"))["ssl_hybrid"]
    assert saved["base_model"] == "runs/base" and saved["steps"] == 7 and "loss" not in saved
    assert result["model"] == str(tmp_path / "ft")
