"""Shard writer: round trip, labels, manifest, skipped files, symlinks, re-encoding, interruption."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from data_helpers import jpeg_bytes

from ssl_hybrid.data import shards
from ssl_hybrid.data.sources import resolve_shards
from ssl_hybrid.data.stream import read_shard
from ssl_hybrid.errors import UserError


def read_all(out: Path) -> list[dict]:
    return [sample for url in resolve_shards(str(out)) for sample in read_shard(url)]


def test_labeled_round_trip(image_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    manifest = shards.write_shards(image_folder, out, shard_size=4, seed=3, progress=False)
    assert manifest["format"] == "ssl_hybrid-shards/1"
    assert manifest["num_samples"] == 18 and manifest["classes"] == ["alpha", "beta", "gamma"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 4, 2]
    assert [s["name"] for s in manifest["shards"]] == [f"out-{i:06d}.tar" for i in range(5)]
    assert manifest["skipped"] == [] and manifest["shard_size"] == 4
    assert json.loads((out / "classes.json").read_text()) == ["alpha", "beta", "gamma"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for item in manifest["shards"]:
        assert hashlib.sha256((out / item["name"]).read_bytes()).hexdigest() == item["sha256"]
    samples = read_all(out)
    sources = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    assert len(samples) == 18
    for sample in samples:
        meta = json.loads(sample["json"])
        class_name, source = meta["class_name"], meta["source"]
        assert source in sources and source.startswith(class_name + "/")
        assert int(sample["cls"]) == ["alpha", "beta", "gamma"].index(class_name)
        assert sample["__key__"] == source.rsplit(".", 1)[0]
        extension = source.rsplit(".", 1)[1]
        assert sample[extension] == (image_folder / source).read_bytes()  # original bytes kept
    assert sorted(json.loads(s["json"])["source"] for s in samples) == sources
    # Shuffled with the seed: same seed, same order; another seed, another order.
    again = shards.write_shards(image_folder, tmp_path / "again", shard_size=4, seed=3, progress=False, prefix="out")
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_shuffle_seed_changes_order_and_no_shuffle_sorts(image_folder: Path, tmp_path: Path):
    keys = {}
    for name, kwargs in {"a": dict(seed=0), "b": dict(seed=1), "sorted": dict(shuffle=False)}.items():
        shards.write_shards(image_folder, tmp_path / name, shard_size=100, progress=False, **kwargs)
        keys[name] = [s["__key__"] for s in read_all(tmp_path / name)]
    assert sorted(keys["a"]) == sorted(keys["b"]) == keys["sorted"]
    assert keys["a"] != keys["b"]


def test_flat_folder_is_unlabeled(flat_image_folder: Path, tmp_path: Path):
    manifest = shards.write_shards(flat_image_folder, tmp_path / "flat_shards", shard_size=3, workers=2, progress=False)
    assert manifest["classes"] is None and manifest["num_samples"] == 10
    assert not (tmp_path / "flat_shards" / "classes.json").exists()
    samples = read_all(tmp_path / "flat_shards")
    assert sorted(s["__key__"] for s in samples) == [f"img_{i:03d}" for i in range(10)]
    assert all("cls" not in s and "json" not in s for s in samples)


def test_list_file_with_classes_and_label_regex(tmp_path: Path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("Cat_1.jpg", "Cat_2.jpg", "dog_1.jpg"):
        (images / name).write_bytes(jpeg_bytes(len(name)))
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimgs/Cat_1.jpg\tcat\n\nimgs/dog_1.jpg\tdog\n" + f"{images / 'Cat_2.jpg'}\tcat\n")
    manifest = shards.write_shards(listing, tmp_path / "from_list", progress=False)
    assert manifest["classes"] == ["cat", "dog"] and manifest["num_samples"] == 3
    labels = {s["__key__"]: int(s["cls"]) for s in read_all(tmp_path / "from_list")}
    assert labels == {"imgs/Cat_1": 0, "imgs/Cat_2": 0, "imgs/dog_1": 1}

    regex = shards.write_shards(images, tmp_path / "regex", label_regex=r"^(.*)_\d+\.\w+$", progress=False)
    assert regex["classes"] == ["Cat", "dog"]
    labels = {s["__key__"]: int(s["cls"]) for s in read_all(tmp_path / "regex")}
    assert labels == {"Cat_1": 0, "Cat_2": 0, "dog_1": 1}


@pytest.mark.fault(injected="zero-length, truncated and corrupt image files, and non-images, in a source folder",
                   did="skipped and listed with the reason in manifest.json (ssl-hybrid shards)",
                   lost="nothing but those files")
def test_unreadable_files_are_skipped_and_listed(image_folder: Path, tmp_path: Path):
    (image_folder / "alpha" / "notes.txt").write_text("not an image")
    (image_folder / "beta" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (image_folder / "gamma" / "empty.png").write_bytes(b"")
    truncated = (image_folder / "gamma" / "gamma_1.jpg").read_bytes()[:200]
    (image_folder / "gamma" / "cut.jpg").write_bytes(truncated)
    manifest = shards.write_shards(image_folder, tmp_path / "out", shard_size=5, progress=False)
    reasons = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == {"alpha/notes.txt", "beta/broken.jpg", "gamma/empty.png", "gamma/cut.jpg"}
    assert "not an image extension" in reasons["alpha/notes.txt"]
    assert "zero-byte" in reasons["gamma/empty.png"]
    assert "not a readable image" in reasons["beta/broken.jpg"]
    assert manifest["num_samples"] == 18 == len(read_all(tmp_path / "out"))


def test_decompression_bomb_refused_by_writer(image_folder: Path, tmp_path: Path, monkeypatch):
    from PIL import Image

    # A "bomb" relative to a lowered limit: 300x300 declared pixels, while the fixture images have 64x48.
    Image.new("RGB", (300, 300)).save(image_folder / "alpha" / "huge.png")
    monkeypatch.setattr(shards, "MAX_IMAGE_PIXELS", 64 * 48)
    manifest = shards.write_shards(image_folder, tmp_path / "out", progress=False)
    assert [item["path"] for item in manifest["skipped"]] == ["alpha/huge.png"]
    assert "decompression bomb refused" in manifest["skipped"][0]["reason"]
    assert manifest["num_samples"] == 18
    monkeypatch.setattr(shards, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match="none of the 19 images could be read"):
        shards.write_shards(image_folder, tmp_path / "none", progress=False)


@pytest.mark.fault(injected="symlinks (to a file and to a folder) leading out of the source folder",
                   did="not followed; listed as skipped in manifest.json",
                   lost="nothing (the outside files are never read)")
def test_symlinks_out_of_source_are_not_followed(image_folder: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes(99))
    os.symlink(outside / "secret.jpg", image_folder / "alpha" / "secret.jpg")
    os.symlink(outside, image_folder / "beta" / "linked_dir")
    os.symlink(image_folder / "gamma" / "gamma_1.jpg", image_folder / "gamma" / "inside_link.jpg")
    manifest = shards.write_shards(image_folder, tmp_path / "out", progress=False)
    reasons = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert reasons["alpha/secret.jpg"] == "symlink leaves the source folder"
    assert "not followed" in reasons["beta/linked_dir"]
    keys = {s["__key__"] for s in read_all(tmp_path / "out")}
    assert "gamma/inside_link" in keys and not any("secret" in k for k in keys)
    assert manifest["num_samples"] == 19


def test_max_side_reencodes_jpeg(image_folder: Path, tmp_path: Path):
    import io

    from PIL import Image

    shards.write_shards(image_folder, tmp_path / "small", max_side=32, quality=70, progress=False)
    samples = read_all(tmp_path / "small")
    assert len(samples) == 18 and all(set(s) >= {"jpg", "cls", "json"} and "png" not in s for s in samples)
    sizes = {Image.open(io.BytesIO(s["jpg"])).size for s in samples}
    assert sizes == {(32, 24)}


@pytest.mark.fault(injected="ssl-hybrid shards re-run over a complete output, interrupted mid-shard; a stale shard "
                            "from an older run",
                   did="the previous output stays as it was (manifest and shards readable), no temp folder is left; "
                       "the completed re-run swaps the whole new set in, the stale shard gone",
                   lost="nothing")
def test_interrupted_rerun_keeps_the_previous_output_and_a_complete_one_replaces_it(image_folder: Path,
                                                                                   tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    previous = shards.write_shards(image_folder, out, shard_size=6, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_load = shards._load_item
    calls = {"n": 0}

    def interrupting_load(args):
        calls["n"] += 1
        if calls["n"] == 10:  # after two complete 4-sample shards, in the middle of the third
            raise KeyboardInterrupt
        return real_load(args)

    monkeypatch.setattr(shards, "_load_item", interrupting_load)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(image_folder, out, shard_size=4, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no temp folder beside it
    assert len(read_all(out)) == previous["num_samples"] == 18

    monkeypatch.setattr(shards, "_load_item", real_load)
    (out / "out-000009.tar").write_bytes(b"stale shard from an older run")
    (tmp_path / ".out.partial-0badc0de").mkdir()  # the temp folder of a run killed with SIGKILL
    manifest = shards.write_shards(image_folder, out, shard_size=4, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    assert manifest["num_samples"] == 18 == len(read_all(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]


def test_an_output_folder_with_other_files_is_refused_and_left_alone(image_folder: Path, tmp_path: Path):
    before = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*"))
    with pytest.raises(UserError, match=r"holds 'alpha', which is not part of a shard set"):
        shards.write_shards(image_folder, image_folder, progress=False)  # --out = --src: replacing it would delete it
    assert sorted(p.relative_to(image_folder) for p in image_folder.rglob("*")) == before


def test_source_errors(tmp_path: Path):
    with pytest.raises(UserError, match="source not found"):
        shards.write_shards(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        shards.write_shards(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="shard-size"):
        shards.write_shards(tmp_path / "empty", tmp_path / "out", shard_size=0, progress=False)


def test_sample_keys_are_stable_and_dot_free():
    assert shards.sample_key("cats/Abyssinian_1.jpg") == "cats/Abyssinian_1"
    assert shards.sample_key("v1.0/a.b.png") == "v1_0/a_b"
    assert shards.sample_key("noext") == "noext"
    assert shards.sample_key("../../outside/x.jpg") == "outside/x"  # list entries above the list file
    assert shards.sample_key("./a//b.jpg") == "a/b"
