"""Streaming loader: shard specs, rank x worker split, exact resume, bad data, skip-rate stop."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from data_helpers import NicenessViews, jpeg_bytes, write_manifest, write_tar

from ssl_hybrid.data import shards as shard_format
from ssl_hybrid.data.sources import resolve_shards
from ssl_hybrid.data.stream import (
    DataQualityError,
    build_train_stream,
    decode_image,
    decode_image_or_reason,
    read_shard,
)
from ssl_hybrid.data.views import build_transform
from ssl_hybrid.errors import UserError


def take(stream, n: int) -> list[dict]:
    return list(itertools.islice(stream, n))


def all_keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


# ---------------------------------------------------------------------------------------------
# Shard specs and decoding
# ---------------------------------------------------------------------------------------------


def test_resolve_shards_forms(good_shards: Path, tmp_path: Path):
    expected = [str(good_shards / f"good-{i:06d}.tar") for i in range(8)]
    assert resolve_shards(str(good_shards)) == expected
    assert resolve_shards(str(good_shards / "manifest.json")) == expected
    assert resolve_shards(str(good_shards / "good-{000000..000007}.tar")) == expected
    assert resolve_shards(f"{good_shards}/good-{{000000..000001}}.tar::{good_shards}/good-000005.tar") == \
        [expected[0], expected[1], expected[5]]
    listing = good_shards / "shards.txt"
    listing.write_text("# two shards\ngood-000003.tar\n\n" + expected[4] + "\n")
    assert resolve_shards(str(listing)) == [expected[3], expected[4]]
    assert resolve_shards("pipe:cat /x/a-{0..1}.tar") == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar"]
    assert resolve_shards("https://host/b-{000..002}.tar")[-1] == "https://host/b-002.tar"
    with pytest.raises(UserError, match="2 of 2 shards not found"):
        resolve_shards(str(tmp_path / "missing-{0..1}.tar"))
    with pytest.raises(UserError, match="no manifest.json"):
        resolve_shards(str(tmp_path))


def test_pipe_urls_are_read_through_webdataset_gopen(good_shards: Path, tiny_cfg, tiny_views):
    spec = f"pipe:cat {good_shards}/good-{{000000..000003}}.tar"
    stream = build_train_stream(tiny_cfg(spec, num_workers=0), 4, 0, 0, 1, tiny_views, epochs=1)
    assert sorted(all_keys(list(stream))) == sorted(f"s{s}_{i}" for s in range(4) for i in range(3))


def test_embedded_default_corpus(tiny_cfg, tiny_views, monkeypatch, tmp_path: Path):
    from ssl_hybrid.config import DEFAULT_CORPUS, REPO_ROOT

    corpus = REPO_ROOT / DEFAULT_CORPUS
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["num_samples"] == 370 and len(manifest["classes"]) == 37 and manifest["skipped"] == []
    assert sum(p.stat().st_size for p in (REPO_ROOT / "data").rglob("*") if p.is_file()) < 10 * 2**20
    assert "CC BY-SA 4.0" in (REPO_ROOT / "data" / "ATTRIBUTION.md").read_text()
    assert "ssl-hybrid shards --src" in (REPO_ROOT / "data" / "README.md").read_text()
    monkeypatch.chdir(tmp_path)  # the default spec also resolves from another working directory
    batch = take(build_train_stream(tiny_cfg(DEFAULT_CORPUS, resampled=True), 4, 0, 0, 1, tiny_views), 1)[0]
    assert len(batch["key"]) == 4 and int(batch["label"].max()) < 37


def test_image_folder_as_train_is_sharded_once_into_the_cache(image_folder: Path, tmp_path: Path, monkeypatch,
                                                              tiny_cfg, tiny_views):
    monkeypatch.setenv("SSL_HYBRID_CACHE", str(tmp_path / "cache"))
    urls = resolve_shards(str(image_folder))
    cached = Path(urls[0]).parent
    assert cached.parent == tmp_path / "cache" / "shards"
    manifest = json.loads((cached / "manifest.json").read_text())
    assert manifest["num_samples"] == 18 and manifest["classes"] == ["alpha", "beta", "gamma"]
    stamp = (cached / "manifest.json").stat().st_mtime_ns
    assert resolve_shards(str(image_folder)) == urls  # reused, not rewritten
    assert (cached / "manifest.json").stat().st_mtime_ns == stamp
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    batch = take(build_train_stream(tiny_cfg(str(image_folder), resampled=True), 4, 0, 0, 1, tiny_views), 1)[0]
    assert len(batch["key"]) == 4
    (image_folder / "alpha" / "alpha_0.png").unlink()  # the folder changed: a new shard set
    changed = resolve_shards(str(image_folder))
    assert Path(changed[0]).parent != cached
    assert json.loads((Path(changed[0]).parent / "manifest.json").read_text())["num_samples"] == 17


def test_manifest_listing_a_missing_shard_fails_fast(good_shards: Path):
    (good_shards / "good-000003.tar").unlink()
    with pytest.raises(UserError, match="1 of 8 listed shards are missing, e.g. good-000003.tar"):
        resolve_shards(str(good_shards))


def test_decode_image_handles_modes_and_bad_bytes():
    from PIL import Image

    gray = decode_image({"__key__": "g", "jpg": jpeg_bytes(0, mode="L")})
    assert gray.mode == "RGB" and gray.size == (24, 20)
    assert decode_image({"__key__": "x", "png": b"\x89PNG broken"}) is None
    assert decode_image_or_reason({"__key__": "z", "jpg": b""})[1] == "zero-byte file"
    assert "no image in sample" in decode_image_or_reason({"__key__": "n", "cls": b"1"})[1]
    import io

    buffer = io.BytesIO()
    Image.new("I;16", (4, 4), 65535).save(buffer, format="PNG")
    deep = decode_image({"__key__": "d", "png": buffer.getvalue()})
    assert deep.mode == "RGB" and deep.getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Split by rank and worker
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_two_workers_disjoint_complete_equal(good_shards: Path, tiny_cfg, tiny_views):
    cfg = tiny_cfg(good_shards, num_workers=2)
    per_rank = []
    for rank in range(2):
        stream = build_train_stream(cfg, 3, seed=7, rank=rank, world_size=2, transform=tiny_views, epochs=1)
        per_rank.append(list(stream))
    keys = [all_keys(batches) for batches in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # 2 shards x 3 samples per worker, batch 3
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(f"s{s}_{i}" for s in range(8) for i in range(3))
    assert len(set(keys[0])) == len(keys[0]) == 12
    # Another epoch draws another shard order, still a partition.
    epoch_two = [all_keys(list(build_train_stream(cfg, 3, 7, r, 2, tiny_views, epochs=2)))[12:] for r in range(2)]
    assert sorted(epoch_two[0] + epoch_two[1]) == sorted(keys[0] + keys[1])
    assert epoch_two[0] != keys[0]


def test_resampled_ranks_get_equal_infinite_streams(good_shards: Path, tiny_cfg, tiny_views):
    cfg = tiny_cfg(good_shards, resampled=True)
    counts = [len(take(build_train_stream(cfg, 4, 0, rank, 3, tiny_views), 20)) for rank in range(3)]
    assert counts == [20, 20, 20]  # 24 samples / 3 ranks would end after 2 batches without resampling


def test_too_few_shards_for_exact_mode(good_shards: Path, tiny_cfg, tiny_views):
    cfg = tiny_cfg(good_shards, num_workers=4, resampled=False)
    with pytest.raises(UserError, match=r"8 shards < 4 ranks x 4 workers = 16"):
        build_train_stream(cfg, 2, 0, 0, 4, tiny_views)
    build_train_stream(tiny_cfg(good_shards, num_workers=4, resampled=True), 2, 0, 0, 4, tiny_views)


# ---------------------------------------------------------------------------------------------
# Exact resume of the data position
# ---------------------------------------------------------------------------------------------


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert [b["key"] for b in first] == [b["key"] for b in second]
    for a, b in zip(first, second):
        assert torch.equal(a["label"], b["label"])
        for view_a, view_b in zip(a["global_views"], b["global_views"]):
            assert torch.equal(view_a, view_b)


@pytest.mark.parametrize("workers,resampled", [(0, True), (0, False), pytest.param(2, True, marks=pytest.mark.slow),
                                               pytest.param(2, False, marks=pytest.mark.slow)])
def test_exact_resume(good_shards: Path, tiny_cfg, workers: int, resampled: bool):
    # Real lightly DINO views at 32 px, so augmentation seeding is part of what must match.
    cfg = tiny_cfg(good_shards, num_workers=workers, resampled=resampled, shuffle_buffer=7)
    transform = build_transform(cfg)
    n, m = 5, 6  # crosses worker-epoch boundaries (a worker-epoch is 6 samples = 3 batches of 2 at 2 workers)

    def fresh():
        return build_train_stream(cfg, 2, seed=11, rank=1, world_size=2, transform=transform)

    straight = take(fresh(), n + m)
    first = fresh()
    head = take(first, n)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON/checkpoint round trip
    assert state["batches"] == n and state["samples"] == 2 * n
    resumed = fresh()
    resumed.load_state_dict(state)
    tail = take(resumed, m)
    assert_same_batches(head + tail, straight)
    assert resumed.stats()["batches"] == n + m
    # Iterating a stream again continues from where it stopped, too.
    assert_same_batches(take(first, m), tail)
    # The views are augmented, and differ between the two global crops.
    assert not torch.equal(straight[0]["global_views"][0], straight[0]["global_views"][1])


def test_resume_refuses_other_settings(good_shards: Path, tiny_cfg, tiny_views):
    stream = build_train_stream(tiny_cfg(good_shards), 2, 0, 0, 1, tiny_views)
    take(stream, 2)
    state = stream.state_dict()
    other = build_train_stream(tiny_cfg(good_shards, num_workers=2), 2, 0, 0, 1, tiny_views)
    with pytest.raises(UserError, match="num_workers saved 0, now 2"):
        other.load_state_dict(state)
    with pytest.raises(UserError, match="seed saved 0, now 1"):
        build_train_stream(tiny_cfg(good_shards), 2, 1, 0, 1, tiny_views).load_state_dict(state)


def test_main_process_rng_is_left_alone(good_shards: Path, tiny_cfg, tiny_views):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(build_train_stream(tiny_cfg(good_shards), 2, 0, 0, 1, tiny_views), 3)
    assert torch.equal(torch.rand(3), expected)


def view_niceness(stream) -> set[float]:
    return {float(value) for batch in take(stream, 2) for value in batch["global_views"][0].flatten()}


@pytest.mark.parametrize("setting, cuda, expected_raise", [(-1, False, 19), (-1, True, 0), (7, False, 7), (0, False, 0)])
def test_workers_run_at_the_configured_priority(good_shards: Path, tiny_cfg, monkeypatch, setting: int, cuda: bool,
                                                expected_raise: int):
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    trainer = os.nice(0)
    stream = build_train_stream(tiny_cfg(good_shards, num_workers=1, worker_nice=setting), 2, 0, 0, 1, NicenessViews())
    assert view_niceness(stream) == {float(max(trainer, expected_raise))}
    assert os.nice(0) == trainer  # the trainer keeps its priority


def test_no_workers_never_renices_the_trainer(good_shards: Path, tiny_cfg):
    import os

    trainer = os.nice(0)
    stream = build_train_stream(tiny_cfg(good_shards, num_workers=0, worker_nice=19), 2, 0, 0, 1, NicenessViews())
    assert view_niceness(stream) == {float(trainer)}
    assert os.nice(0) == trainer


# ---------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def broken_shards(tmp_path: Path) -> Path:
    """Shard a: 4 good + corrupt bytes + zero-byte image + sample without image + member without extension;
    shard b: 5 samples cut in the middle of the 4th (3 good read, 2 lost); shard c: zero-byte file (2 lost)."""
    directory = tmp_path / "broken"
    directory.mkdir()
    members = [(f"a_good{i}.jpg", jpeg_bytes(i)) for i in range(2)]
    members += [("a_corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("a_corrupt.cls", b"1"),
                ("a_zero.png", b""), ("a_noimage.cls", b"1"), ("a_noimage.json", b"{}"),
                ("a_noext", jpeg_bytes(5))]
    members += [(f"a_good{i}.jpg", jpeg_bytes(i)) for i in range(2, 4)]
    write_raw_tar(directory / "x-a.tar", members)
    full = write_tar(directory / "full.tar", [{"__key__": f"b_{i}", "jpg": jpeg_bytes(10 + i)} for i in range(5)])
    data = full.read_bytes()
    cut = data.index(b"b_3.jpg") + 512 + 100  # header of b_3's image + 100 bytes of its data
    (directory / "x-b.tar").write_bytes(data[:cut])
    full.unlink()
    (directory / "x-c.tar").write_bytes(b"")
    write_manifest(directory, {"x-a.tar": 8, "x-b.tar": 5, "x-c.tar": 2})
    return directory


@pytest.mark.fault(injected="corrupt, zero-byte and missing images, a member without extension, a shard cut mid-"
                            "member, a zero-byte shard",
                   did="each skipped with a warning naming url and key, counted exactly (samples lost in a cut "
                       "shard from the manifest)",
                   lost="nothing but the unreadable samples")
def test_bad_samples_and_shards_are_skipped_and_counted_exactly(broken_shards: Path, tiny_cfg, tiny_views, caplog):
    cfg = tiny_cfg(broken_shards, max_skip_rate=0.9)
    stream = build_train_stream(cfg, 2, 0, 0, 1, tiny_views, epochs=1)
    keys = all_keys(list(stream))
    assert sorted(keys) == ["a_good0", "a_good1", "a_good2", "a_good3", "b_0", "b_1", "b_2"]
    # 4 bad in a, 2 lost from the cut b (b_3 partly read, b_4 never), 2 lost from the empty c.
    assert stream.stats() == {"seen": 15, "skipped": 8, "skip_rate": 8 / 15, "batches": 4, "samples": 7,
                              "epoch": 1}
    messages = caplog.text
    for key in ("a_corrupt", "a_zero", "a_noimage", "a_noext"):
        assert key in messages
    assert "x-b.tar" in messages and "x-c.tar" in messages


def test_cut_shard_without_manifest_counts_one_loss(broken_shards: Path, tiny_cfg, tiny_views):
    cfg = tiny_cfg(str(broken_shards / "x-b.tar"), max_skip_rate=0.9)
    stream = build_train_stream(cfg, 1, 0, 0, 1, tiny_views, epochs=1)
    assert all_keys(list(stream)) and stream.stats()["skipped"] == 1 and stream.stats()["seen"] == 4


@pytest.mark.fault(injected="more corrupt samples than data.max_skip_rate allows",
                   did="the stream stops with one line naming rank, worker, counts and the last bad sample",
                   lost="nothing (no training on a broken corpus)")
def test_skip_rate_stops_the_run(broken_shards: Path, tiny_cfg, tiny_views):
    cfg = tiny_cfg(broken_shards, max_skip_rate=0.1)
    with pytest.raises(DataQualityError, match=r"8 of 15 samples skipped .*data\.max_skip_rate=0\.1"):
        take(build_train_stream(cfg, 2, 0, 0, 1, tiny_views), 100)
    # The threshold is also judged during an epoch once skip_rate_min_samples samples were seen.
    early = tiny_cfg(broken_shards, max_skip_rate=0.1, skip_rate_min_samples=5, shuffle_buffer=0)
    with pytest.raises(DataQualityError, match=r"of 5 samples skipped"):
        take(build_train_stream(early, 1, 0, 0, 1, tiny_views), 100)
    assert issubclass(DataQualityError, UserError)


@pytest.mark.slow
def test_skip_rate_stop_with_workers_and_all_corrupt(tmp_path: Path, tiny_cfg, tiny_views):
    directory = tmp_path / "rotten"
    directory.mkdir()
    for shard in range(2):
        write_tar(directory / f"r-{shard}.tar", [{"__key__": f"r{shard}_{i}", "jpg": b"junk"} for i in range(3)])
    write_manifest(directory, {"r-0.tar": 3, "r-1.tar": 3})
    cfg = tiny_cfg(directory, num_workers=2, max_skip_rate=1.0)  # even "allow everything" must not hang
    with pytest.raises(DataQualityError, match="no usable sample"):
        take(build_train_stream(cfg, 2, 0, 0, 1, tiny_views), 5)


def test_decompression_bomb_is_refused_by_the_stream(good_shards: Path, tiny_cfg, tiny_views, monkeypatch):
    monkeypatch.setattr(shard_format, "MAX_IMAGE_PIXELS", 24 * 20 - 1)  # every test image is 24x20
    reason = decode_image_or_reason(next(read_shard(str(good_shards / "good-000000.tar"))))[1]
    assert reason.startswith("decompression bomb refused")
    with pytest.raises(DataQualityError, match="decompression bomb"):
        take(build_train_stream(tiny_cfg(good_shards), 2, 0, 0, 1, tiny_views), 1)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_batch_layout_with_lightly_views(good_shards: Path, tiny_cfg):
    cfg = tiny_cfg(good_shards, num_local_views=2, resampled=True)
    batch = take(build_train_stream(cfg, 4, 0, 0, 1, build_transform(cfg)), 1)[0]
    assert set(batch) == {"global_views", "local_views", "key", "label"}
    assert [tuple(v.shape) for v in batch["global_views"]] == [(4, 3, 32, 32)] * 2
    assert [tuple(v.shape) for v in batch["local_views"]] == [(4, 3, 16, 16)] * 2
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    assert all(isinstance(k, str) for k in batch["key"])


def test_unlabeled_shards_have_no_label(flat_image_folder: Path, tmp_path: Path, tiny_cfg, tiny_views):
    shard_format.write_shards(flat_image_folder, tmp_path / "flat_shards", shard_size=4, progress=False)
    batch = take(build_train_stream(tiny_cfg(tmp_path / "flat_shards"), 5, 0, 0, 1, tiny_views), 1)[0]
    assert "label" not in batch and len(batch["key"]) == 5
