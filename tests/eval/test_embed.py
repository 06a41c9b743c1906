"""embed / neighbors / predict --bank: the evaluators' features and neighbours, resumable chunks, refusals."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from ssl_hybrid.cli import main
from ssl_hybrid.errors import UserError
from ssl_hybrid.eval import embed as emb

SPEC, SIZE, BATCH = "random:hybrid_nano", 32, 4


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _embedder(spec: str = SPEC) -> emb.Embedder:
    return emb.load_embedder(spec, SIZE, batch_size=BATCH)


def test_embed_and_neighbors_give_the_knn_evaluators_features_and_neighbours(labeled_pair, tmp_path):
    from ssl_hybrid.data.labeled import check_images, load_labeled
    from ssl_hybrid.eval.features import features_for_spec
    from ssl_hybrid.eval.knn import knn_predict, l2_normalize, search
    from ssl_hybrid.eval.predict import predict_with_bank

    train_dir, test_dir = labeled_pair
    train, test = check_images(load_labeled(train_dir)), check_images(load_labeled(test_dir))
    _, ((train_f, train_y), (test_f, _)) = features_for_spec(SPEC, [train, test], SIZE, BATCH, 0, None)
    k = 5
    sims, indices = search(l2_normalize(train_f), l2_normalize(test_f), k)  # what knn_evaluate searches

    embedder = _embedder()
    meta = emb.embed_folder(embedder, str(train_dir), tmp_path / "emb", chunk_size=2 * BATCH)
    embeddings = emb.open_embeddings(tmp_path / "emb")
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / emb.EMBEDDINGS), l2_normalize(train_f))
    assert [s.id for s in embeddings.items.samples] == train.ids and meta["count"] == len(train)
    assert [s.label for s in embeddings.items.samples] == train_y.tolist()

    results = emb.nearest(embeddings, [s.path for s in test.samples], k, embedder)
    found = np.array([[train.ids.index(n["id"]) for n in r["neighbours"]] for r in results])
    np.testing.assert_array_equal(found, indices)
    np.testing.assert_allclose([[n["similarity"] for n in r["neighbours"]] for r in results], sims, atol=1e-6)

    # predict --bank: the evaluator's weighted vote, as each class's share of the vote weight
    scores = knn_predict(train_f, train_y, test_f, num_classes=len(train.classes))
    result = predict_with_bank(SPEC, str(train_dir), [str(test_dir)], image_size=SIZE, batch_size=BATCH, top=3)
    got = np.array([[t["probability"] for t in sorted(r["top"], key=lambda t: t["label"])] for r in result["predictions"]])
    np.testing.assert_allclose(got, scores / scores.sum(1, keepdims=True), rtol=1e-9)
    assert [r["top"][0]["class"] for r in result["predictions"]] == [train.classes[c] for c in scores.argmax(1)]


@pytest.mark.fault(injected="embed interrupted (KeyboardInterrupt) after its first saved chunk",
                   did="the re-run embeds only the missing chunks and writes the same files as an uninterrupted run",
                   lost="nothing: finished chunks are kept in .parts/ until the folder is complete")
def test_an_interrupted_embed_resumes_without_recomputing_done_chunks(labeled_pair, tmp_path, monkeypatch):
    data, out, whole = labeled_pair[0], tmp_path / "emb", tmp_path / "whole"
    emb.embed_folder(_embedder(), str(data), whole, chunk_size=BATCH)
    calls, interrupt = [], [True]
    features = emb.Embedder.features

    def interrupted(self, labeled):
        calls.append(len(labeled))
        if len(calls) == 2 and interrupt and interrupt.pop():
            raise KeyboardInterrupt
        return features(self, labeled)

    monkeypatch.setattr(emb.Embedder, "features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        emb.embed_folder(_embedder(), str(data), out, chunk_size=BATCH)
    assert not (out / emb.META).exists() and len(list((out / emb.PARTS).glob("chunk_*.npz"))) == 1
    calls.clear()
    emb.embed_folder(_embedder(), str(data), out, chunk_size=3 * BATCH)  # resumed in the chunks it started with
    assert len(calls) == 4  # 18 images in chunks of 4: 5 chunks, the first one already done
    np.testing.assert_array_equal(np.load(out / emb.EMBEDDINGS), np.load(whole / emb.EMBEDDINGS))
    assert (out / emb.IDS).read_text() == (whole / emb.IDS).read_text()
    assert not (out / emb.PARTS).exists()
    calls.clear()
    assert emb.embed_folder(_embedder(), str(data), out, chunk_size=BATCH)["count"] == 18 and calls == []  # complete


@pytest.mark.fault(injected="embed into a folder holding another backbone's embeddings (complete or interrupted)",
                   did="refused with one line naming both backbones' hashes",
                   lost="nothing: the folder's files are unchanged")
def test_a_folder_of_another_backbone_is_refused_not_mixed(labeled_pair, tmp_path, capsys):
    out = tmp_path / "emb"
    code, _, _ = _run(capsys, "embed", SPEC, labeled_pair[0], "--out", out, "--image-size", SIZE, "--workers", 0)
    assert code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, out_text, err = _run(capsys, "embed", "random:resnet10t", labeled_pair[0], "--out", out, "--image-size", SIZE,
                               "--workers", 0)
    assert code == 2 and "another backbone" in err and "random:hybrid_nano" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the same refusal for an interrupted run's parts
    shutil.rmtree(out)
    parts = out / emb.PARTS
    parts.mkdir(parents=True)
    (parts / emb.META).write_text(json.dumps({"identity": {"backbone_hash": "0123"}, "backbone": {"spec": "x"}}))
    with pytest.raises(UserError, match="another backbone"):
        emb.embed_folder(_embedder(), str(labeled_pair[0]), out)
    assert list(parts.iterdir()) == [parts / emb.META]


@pytest.mark.fault(injected="a corrupt image and an exact duplicate in a flat (unlabeled) folder to embed",
                   did="the corrupt image is skipped and counted in meta.json; --duplicates lists the copy at similarity 1",
                   lost="the corrupt image only")
def test_unlabeled_folder_with_corrupt_image_duplicates_grid_and_map(flat_image_folder, tmp_path, capsys):
    (flat_image_folder / "broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(flat_image_folder / "img_003.jpg", flat_image_folder / "img_003_copy.jpg")
    out = tmp_path / "emb"
    code, text, _ = _run(capsys, "embed", SPEC, flat_image_folder, "--out", out, "--image-size", SIZE, "--workers", 0,
                         "--batch-size", BATCH, "--plot")
    assert code == 0 and "1 unreadable image(s) skipped" in text
    meta = json.loads((out / emb.META).read_text())
    assert meta["count"] == 11 and [s["id"] for s in meta["skipped_unreadable"]] == ["broken.jpg"]
    assert meta["backbone"]["hash"] and meta["pooling"] == "multiscale" and meta["data"]["labeled"] is False
    rows = list(csv.DictReader((out / emb.IDS).open()))
    assert "broken.jpg" not in [r["id"] for r in rows] and {r["label"] for r in rows} == {"-1"}
    vectors = np.load(out / emb.EMBEDDINGS, mmap_mode="r")
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, text, _ = _run(capsys, "neighbors", out, "--duplicates", "0.999", "--out", tmp_path / "dups.csv")
    pairs = list(csv.DictReader((tmp_path / "dups.csv").open()))
    assert code == 0 and [(p["a"], p["b"]) for p in pairs] == [("img_003.jpg", "img_003_copy.jpg")]

    code, text, _ = _run(capsys, "neighbors", out, "img_003.jpg", flat_image_folder / "img_005.jpg", "-k", 3,
                         "--out", tmp_path / "n.json", "--grid", tmp_path / "grid.png")
    results = json.loads((tmp_path / "n.json").read_text())["results"]
    assert code == 0 and [n["id"] for n in results[0]["neighbours"]][0] == "img_003_copy.jpg"  # not itself
    assert results[1]["neighbours"][0]["id"] == "img_005.jpg" and results[1]["neighbours"][0]["similarity"] > 0.9999
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"

    code, _, err = _run(capsys, "neighbors", out, "no_such_image.jpg")
    assert code == 2 and "no_such_image.jpg" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "predict", SPEC, tmp_path / "missing.jpg", "--bank", flat_image_folder)
    assert code == 2 and "missing.jpg" in err


def test_load_images_reads_unlabeled_shards_and_image_lists(flat_image_folder, image_folder, tmp_path):
    from ssl_hybrid.data.labeled import UNLABELED, load_images, load_labeled
    from ssl_hybrid.data.shards import write_shards

    write_shards(flat_image_folder, tmp_path / "shards", shard_size=4, labels="none", shuffle=False)
    shards = load_images(tmp_path / "shards")
    assert len(shards) == 10 and shards.classes == [] and {s.label for s in shards.samples} == {UNLABELED}
    assert shards.load_image(3).size[0] > 0  # the image bytes are found inside the tar
    listing = tmp_path / "list.txt"
    listing.write_text(f"{flat_image_folder / 'img_001.jpg'}\tcat\n{flat_image_folder / 'img_002.jpg'}\tdog\n")
    listed = load_images(listing)
    assert listed.classes == ["cat", "dog"] and listed.labels.tolist() == [0, 1]
    labeled = load_images(image_folder)  # class sub-folders: the evaluators' reader, same order
    assert labeled.ids == load_labeled(image_folder).ids and labeled.classes == ["alpha", "beta", "gamma"]
    with pytest.raises(UserError, match="not found"):
        load_images(tmp_path / "nowhere")


def test_map_is_umap_when_importable_else_pca_coloured_by_label(tmp_path, monkeypatch):
    import sys
    import types

    from ssl_hybrid.data.labeled import LabeledSet, Sample

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    items = LabeledSet("synthetic", ["a", "b", "c"], [Sample(f"{i}", i % 3, "x.jpg") for i in range(30)])
    embeddings = emb.Embeddings(tmp_path, {"backbone": {"model": "m"}, "pooling": "default"}, vectors, items)
    monkeypatch.setitem(sys.modules, "umap", None)  # not installed: PCA, the two leading components
    drawn = emb.plot_map(embeddings, tmp_path / "pca.png")
    assert drawn["method"] == "pca" and drawn["coloured_by_label"] and drawn["points"] == 30
    points, _ = emb._project(vectors, "pca", 0)
    centred = vectors - vectors.mean(0)
    assert np.isclose(points[:, 0].var(), np.linalg.svd(centred, compute_uv=False)[0] ** 2 / 30, rtol=1e-4)
    with pytest.raises(UserError, match="umap-learn"):
        emb._project(vectors, "umap", 0)

    fitted = []

    class UMAP:  # the umap-learn API the map uses
        def __init__(self, **kwargs):
            fitted.append(kwargs)

        def fit_transform(self, x):
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=UMAP))
    assert emb.plot_map(embeddings, tmp_path / "umap.png")["method"] == "umap" and fitted[0]["metric"] == "cosine"
