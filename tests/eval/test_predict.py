"""predict MODEL IMAGES: a saved classifier folder's top classes (the --bank mode is tested in test_embed.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from ssl_hybrid.cli import main

SIZE = 32


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def classifier_folder(tmp_path):
    """A hybrid_nano classifier with 3 named classes, saved in the model-folder format."""
    import timm

    from ssl_hybrid.models.export import save_model_folder

    torch.manual_seed(0)
    model = timm.create_model("hybrid_nano", num_classes=3, img_size=SIZE).eval()
    folder = tmp_path / "classifier"
    save_model_folder(model, folder, label_names=["alpha", "beta", "gamma"], extra={"image_size": SIZE})
    return model, folder


def test_predict_prints_and_writes_the_classifiers_softmax(classifier_folder, image_folder, tmp_path, capsys):
    from ssl_hybrid.data.labeled import load_labeled
    from ssl_hybrid.eval.features import eval_transform

    model, folder = classifier_folder
    images = load_labeled(image_folder)
    with torch.inference_mode():
        batch = torch.stack([eval_transform(SIZE)(images.load_image(i)) for i in range(len(images))])
        expected = torch.softmax(model(batch).double(), dim=1).numpy()  # [N, 3]

    code, text, _ = _run(capsys, "predict", folder, image_folder, "--top", 2, "--workers", 0, "--out", tmp_path / "p.json")
    assert code == 0 and text.splitlines()[0].startswith("image")
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [p["image"] for p in predictions] == [s.path for s in images.samples]
    names = ["alpha", "beta", "gamma"]
    for row, probs in zip(predictions, expected):
        order = np.argsort(-probs, kind="stable")[:2]
        assert [t["class"] for t in row["top"]] == [names[c] for c in order]
        np.testing.assert_allclose([t["probability"] for t in row["top"]], probs[order], atol=1e-5)
    assert f"{names[int(np.argmax(expected[0]))]} " in text.splitlines()[1]

    code, _, _ = _run(capsys, "predict", folder, image_folder / "beta", "--workers", 0, "--out", tmp_path / "p.csv")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert code == 0 and len(rows) == 6 * 3 and rows[0]["rank"] == "1" and set(rows[0]) >= {"image", "class", "probability"}


@pytest.mark.fault(injected="predict given a backbone folder without a classifier, or a backbone spec without --bank",
                   did="one line (exit 2) saying the folder holds no classifier and how to classify with --bank",
                   lost="nothing")
def test_predict_without_a_classifier_says_to_use_a_bank(tmp_path, image_folder, capsys):
    import timm

    from ssl_hybrid.models.export import save_model_folder

    save_model_folder(timm.create_model("hybrid_nano", num_classes=0, img_size=SIZE), tmp_path / "backbone")
    for model in (tmp_path / "backbone", "random:hybrid_nano"):
        code, _, err = _run(capsys, "predict", model, image_folder)
        assert code == 2 and "--bank" in err and len(err.strip().splitlines()) == 1
