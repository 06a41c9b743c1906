"""Labeled sets (image folders and labeled shards) and seeded k-shot subsets with saved ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_hybrid.data.labeled import (
    LabeledDataError,
    align_classes,
    check_images,
    kshot_indices,
    load_labeled,
    save_split,
    split_indices_by_ids,
    stratified_holdout,
)


def test_image_folder_is_loaded_in_a_deterministic_order(image_folder):
    first, second = load_labeled(image_folder), load_labeled(str(image_folder))
    assert first.classes == ["alpha", "beta", "gamma"]
    assert len(first) == 18 and first.ids == second.ids
    assert first.ids[0] == "alpha/alpha_0.png"
    assert np.bincount(first.labels).tolist() == [6, 6, 6]
    image = first.load_image(5)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_folder_without_class_subfolders_is_one_clear_error(flat_image_folder, tmp_path):
    with pytest.raises(LabeledDataError, match="no class sub-folders"):
        load_labeled(flat_image_folder)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(LabeledDataError, match="hold no images"):
        load_labeled(tmp_path / "empty")


def test_labeled_shards_with_manifest(good_shards):
    labeled = load_labeled(good_shards)
    assert labeled.classes == ["a", "b", "c", "d"]
    assert len(labeled) == 24
    assert labeled.ids[:3] == ["s0_0", "s0_1", "s0_2"]
    assert labeled.labels[:4].tolist() == [0, 1, 2, 1]
    assert labeled.load_image(4).size == (24, 20)  # seeked straight to the member's bytes


def test_shards_written_by_the_shard_writer_round_trip(image_folder, tmp_path):
    from ssl_hybrid.data.shards import write_shards

    out = tmp_path / "shards"
    write_shards(image_folder, out, shard_size=5, progress=False)
    from_shards, from_folder = load_labeled(out), load_labeled(image_folder)
    assert from_shards.classes == from_folder.classes
    assert sorted(from_shards.labels.tolist()) == sorted(from_folder.labels.tolist())
    pixels_by_label = {}
    for i in range(len(from_folder)):
        pixels_by_label.setdefault(from_folder.samples[i].label, []).append(np.asarray(from_folder.load_image(i)))
    for i in range(len(from_shards)):  # each shard image equals a folder image of the same class
        image = np.asarray(from_shards.load_image(i))
        assert any(np.array_equal(image, ref) for ref in pixels_by_label[from_shards.samples[i].label])


@pytest.mark.fault(injected="a corrupt image in a labeled folder (evaluation)",
                   did="one-line error naming the sample",
                   lost="nothing")
def test_corrupt_image_names_the_sample(image_folder):
    (image_folder / "beta" / "beta_2.jpg").write_bytes(b"not an image")
    labeled = load_labeled(image_folder)
    index = labeled.ids.index("beta/beta_2.jpg")
    with pytest.raises(LabeledDataError, match="beta/beta_2.jpg: not a readable image") as err:
        labeled.load_image(index)
    assert "\n" not in str(err.value) and "BytesIO" not in str(err.value)


def test_unreadable_images_are_skipped_and_counted_below_the_skip_rate(image_folder):
    (image_folder / "beta" / "beta_2.jpg").write_bytes(b"not an image")
    checked = check_images(load_labeled(image_folder))  # 1 of 18 = 5.6% <= data.max_skip_rate (10%)
    assert len(checked) == 17 and "beta/beta_2.jpg" not in checked.ids
    assert [item["id"] for item in checked.skipped] == ["beta/beta_2.jpg"]
    assert checked.skipped[0]["path"].endswith("beta/beta_2.jpg") and "readable" in checked.skipped[0]["reason"]
    assert checked.subset([0, 1]).skipped == checked.skipped  # subsets still say what their source lost


def test_too_many_unreadable_images_stop_with_one_line_naming_count_and_file(image_folder):
    for name in ("alpha/alpha_1.jpg", "beta/beta_2.jpg"):
        (image_folder / name).write_bytes(b"")
    with pytest.raises(LabeledDataError) as err:  # 2 of 18 = 11% > 10%
        check_images(load_labeled(image_folder))
    message = str(err.value)
    assert "2 of 18 images are unreadable" in message and "alpha/alpha_1.jpg" in message and "\n" not in message
    assert len(check_images(load_labeled(image_folder), max_skip_rate=0.2)) == 16


def test_class_folders_without_images_are_ignored(image_folder):
    (image_folder / "notes").mkdir()
    (image_folder / "notes" / "readme.txt").write_text("not an image")
    labeled = load_labeled(image_folder)
    assert labeled.classes == ["alpha", "beta", "gamma"] and len(labeled) == 18


def test_kshot_subsets_are_seeded_and_exact():
    labels = np.repeat(np.arange(5), 12)
    a, b = kshot_indices(labels, 3, seed=7), kshot_indices(labels, 3, seed=7)
    np.testing.assert_array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == [3] * 5
    assert len(np.unique(a)) == 15
    assert not np.array_equal(a, kshot_indices(labels, 3, seed=8))


def test_kshot_picks_of_a_class_do_not_depend_on_other_classes():
    labels = np.repeat(np.arange(4), 10)
    full = kshot_indices(labels, 2, seed=3)
    without_class_0 = kshot_indices(labels[10:], 2, seed=3) + 10
    # classes 1..3 keep their picks when class 0 is dropped (generators are seeded per class label)
    np.testing.assert_array_equal(full[labels[full] > 0], without_class_0)


def test_kshot_refuses_more_shots_than_a_class_has():
    with pytest.raises(LabeledDataError, match="fewer than 5 shots"):
        kshot_indices(np.array([0, 0, 0, 1, 1, 1, 1, 1]), 5, seed=0)


def test_saved_split_ids_round_trip(image_folder, tmp_path):
    labeled = load_labeled(image_folder)
    indices = kshot_indices(labeled.labels, 2, seed=1)
    path = save_split(tmp_path / "split.json", labeled, indices.tolist(), shots=2, seed=1)
    saved = json.loads(Path(path).read_text())
    assert saved["shots"] == 2 and saved["seed"] == 1 and len(saved["ids"]) == 6
    np.testing.assert_array_equal(split_indices_by_ids(labeled, saved["ids"]), indices)
    with pytest.raises(LabeledDataError, match="unknown sample"):
        split_indices_by_ids(labeled, ["nope.jpg"])


def test_stratified_holdout_keeps_every_class_on_both_sides():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])
    fit, held = stratified_holdout(labels, 0.2, seed=0)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 1, 1, 0]  # single-sample class stays in fit
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.2, seed=0)[1])


def test_test_set_is_relabeled_by_class_name(tmp_path):
    from PIL import Image

    for split, names in (("train", ["a", "b", "c"]), ("test", ["b", "c"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.png")
    train, test = load_labeled(tmp_path / "train"), load_labeled(tmp_path / "test")
    aligned = align_classes(train, test)
    assert aligned.classes == ["a", "b", "c"] and aligned.labels.tolist() == [1, 2]
    with pytest.raises(LabeledDataError, match="does not occur"):
        align_classes(test, train)


def test_labeled_shards_and_the_stream_read_the_same_samples(tmp_path):
    """One image-key list and one key rule for both readers: a .bmp field (the shard writer keeps a bmp's
    own bytes), a key under a dotted folder, and webdataset's __meta__ members left out."""
    import io
    import tarfile

    from PIL import Image

    from ssl_hybrid.data.stream import decode_image, read_shard

    bmp = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 30, 30)).save(bmp, format="BMP")
    members = [("__info__", b"{}"), ("v1.0/red.bmp", bmp.getvalue()), ("v1.0/red.cls", b"0"),
               ("v1.0/red.json", json.dumps({"class_name": "red"}).encode())]
    shard = tmp_path / "shards" / "mixed.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    labeled = load_labeled(shard.parent)
    streamed = list(read_shard(str(shard)))
    assert labeled.ids == [sample["__key__"] for sample in streamed] == ["v1.0/red"]
    assert labeled.classes == ["red"] and labeled.labels.tolist() == [0]
    assert labeled.load_image(0).size == decode_image(streamed[0]).size == (12, 10)


def test_a_sample_with_broken_json_is_kept_and_the_warning_names_shard_and_sample(tmp_path, caplog):
    import logging

    from tests.data.data_helpers import jpeg_bytes, write_tar

    (tmp_path / "shards").mkdir()
    shard = write_tar(tmp_path / "shards" / "broken_json.tar", [
        {"__key__": "a", "jpg": jpeg_bytes(0), "cls": b"0", "json": b"{not json"},
        {"__key__": "b", "jpg": jpeg_bytes(1), "cls": b"1", "json": json.dumps({"class_name": "blue"}).encode()}])
    with caplog.at_level(logging.WARNING, logger="ssl_hybrid.data.labeled"):
        labeled = load_labeled(shard.parent)
    assert labeled.ids == ["a", "b"] and labeled.classes == ["0", "blue"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(shard) in warnings[0] and "sample 'a'" in warnings[0]
    assert "not valid JSON" in warnings[0]
