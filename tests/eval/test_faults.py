"""Faults the evaluators meet: a backbone that outputs NaN, and a feature cache that is corrupt, foreign,
unwritable, over its size cap or read by several ranks. Faults are injected from outside (NaN weights saved
as a real backbone folder, bytes written over cache files, a monkeypatched writer); the checks are what a
user sees (one line, exit status 2, or a logged cache miss) and the numbers that come back."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_hybrid.cli import main
from ssl_hybrid.data.labeled import load_labeled
from ssl_hybrid.eval import features as feats
from ssl_hybrid.eval.backbones import load_backbone_spec
from ssl_hybrid.eval.features import NonFiniteError, cached_features


class TinyBackbone(torch.nn.Module):
    """The backbone contract (forward_features / forward_head) in one strided convolution, so cache tests cost
    no model time; counts its forward passes (a cache hit makes none) and can output NaN in eval mode only."""

    num_features = 8

    def __init__(self, nan_in_eval: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, self.num_features, 8, stride=8)
        self.calls, self.nan_in_eval = 0, nan_in_eval

    def forward_features(self, x):
        self.calls += 1
        return self.conv(x)

    def forward_head(self, x, pre_logits=False):
        out = x.mean((2, 3))
        return out * float("nan") if self.nan_in_eval and not self.training else out


@pytest.fixture
def nan_backbone(tmp_path) -> Path:
    """A saved backbone folder (what `export` writes) with one NaN weight, as a diverged run leaves."""
    from ssl_hybrid.models.export import save_model_folder

    model, _ = load_backbone_spec("random:hybrid_nano", image_size=32)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_model_folder(model, tmp_path / "diverged", extra={"image_size": 32})
    return tmp_path / "diverged"


@pytest.mark.fault(injected="a backbone with a NaN weight (a diverged run's export) given to knn / linear / "
                            "fewshot / report (one shared extraction)",
                   did="exit 2 with one line naming the backbone (and the first image) instead of a chance-like "
                       "k-NN or a 100% fine-tuning top-1; no result JSON is written",
                   lost="nothing")
def test_a_nan_backbone_is_refused_by_the_evaluators_in_one_line(labeled_pair, nan_backbone, capsys, tmp_path):
    command = "knn"  # linear, fewshot and report run the same extraction (features_for_spec); finetune: below
    code = main([command, str(nan_backbone), "--train", str(labeled_pair[0]), "--test", str(labeled_pair[1]),
                 "--workers", "0", "--out", str(tmp_path / "result.json"), "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"ssl-hybrid {command}: error: {nan_backbone}: ") and "not finite" in lines[0]
    assert not (tmp_path / "result.json").exists() and not list((tmp_path / "cache").glob("*.npz"))


@pytest.mark.fault(injected="fine-tuning a backbone with NaN weights, or one whose logits are NaN at evaluation "
                            "only (finite while training)",
                   did="finetune stops with one line naming the backbone (non-finite loss / logits) on every rank "
                       "instead of scoring 100% top-1",
                   lost="nothing")
@pytest.mark.parametrize("fault, message", [("nan_weights", "the fine-tuning loss is not finite"),
                                            ("nan_in_eval", r"its fine-tuned logits are not finite .* \(first: .*img_")])
def test_finetune_refuses_a_nan_loss_or_nan_logits(labeled_pair, fault, message):
    from ssl_hybrid.eval.finetune import FinetuneSettings, finetune

    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    backbone = TinyBackbone(nan_in_eval=fault == "nan_in_eval")
    if fault == "nan_weights":
        with torch.no_grad():
            backbone.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=f"^nano-run: {message}"):
        finetune(backbone, train, test, 32, FinetuneSettings(epochs=1, batch_size=8), name="nano-run")


def _one_entry(cache: Path) -> Path:
    entries = list(cache.glob("*.npz"))
    assert len(entries) == 1, entries
    return entries[0]


@pytest.mark.fault(injected="a feature cache entry that is truncated, not a zip file, written for another image "
                            "set (copied over the entry), or holds NaN features",
                   did="a logged miss: the features are extracted again, returned correct, and the entry rewritten",
                   lost="nothing (one re-extraction)")
@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_set", "nan"])
def test_a_corrupt_or_foreign_cache_entry_is_a_logged_miss(labeled_pair, tmp_path, caplog, damage):
    train = load_labeled(labeled_pair[0])
    model = TinyBackbone()
    meta = {"hash": "h", "spec": "nano"}
    cache = tmp_path / "cache"
    expected, labels = cached_features(model, meta, train, 32, batch_size=18, cache_dir=cache)
    entry = _one_entry(cache)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "garbage":
        entry.write_bytes(b"not a cache entry")
    elif damage == "other_set":  # a valid entry, for the first 10 images, under this set's name
        other = tmp_path / "other"
        cached_features(model, meta, train.subset(range(10)), 32, batch_size=18, cache_dir=other)
        _one_entry(other).replace(entry)
    else:
        np.savez(entry, features=np.full_like(expected, np.nan), labels=labels, key=np.array(entry.stem))
    calls = model.calls
    with caplog.at_level(logging.WARNING, logger="ssl_hybrid.eval.features"):
        got, got_labels = cached_features(model, meta, train, 32, batch_size=18, cache_dir=cache)
    assert model.calls > calls  # extracted again, not served from the bad entry
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_labels, train.labels)
    assert any(str(entry) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    calls = model.calls
    cached_features(model, meta, train, 32, batch_size=18, cache_dir=cache)
    assert model.calls == calls  # the rewritten entry serves


@pytest.mark.fault(injected="the feature cache cannot be written (disk full, ENOSPC, from the writer)",
                   did="the features are returned and the evaluation goes on, with one warning; no temp file is left",
                   lost="nothing (the next run extracts again)")
def test_an_unwritable_cache_is_a_warning_not_a_crash(labeled_pair, tmp_path, caplog, monkeypatch):
    train = load_labeled(labeled_pair[0]).subset(range(6))
    model, meta = TinyBackbone(), {"hash": "h"}
    real_savez = np.savez

    def full_disk(file, *args, **kwargs):
        real_savez(file, *args, **kwargs)  # the data reaches the disk, then the final flush fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    monkeypatch.setattr(feats.np, "savez", full_disk)
    with caplog.at_level(logging.WARNING, logger="ssl_hybrid.eval.features"):
        got, _ = cached_features(model, meta, train, 32, batch_size=6, cache_dir=tmp_path / "cache")
    assert got.shape == (6, model.num_features) and np.isfinite(got).all()
    assert any("cannot write the feature cache" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.fault(injected="features cached by an fp32 extraction asked for under bf16 autocast (a setting "
                            "outside the weights, data and transform)",
                   did="a miss: the key covers pooling, transform/normalization, image size, device and autocast dtype",
                   lost="nothing")
def test_the_cache_key_covers_the_autocast_dtype(labeled_pair, tmp_path, monkeypatch):
    train = load_labeled(labeled_pair[0]).subset(range(4))
    model = TinyBackbone()
    meta = {"hash": "h"}
    cached_features(model, meta, train, 32, batch_size=4, cache_dir=tmp_path)
    calls = model.calls
    monkeypatch.setattr(feats, "autocast_context", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    cached_features(model, meta, train, 32, batch_size=4, cache_dir=tmp_path)
    assert model.calls > calls and len(list(tmp_path.glob("*.npz"))) == 2


@pytest.mark.fault(injected="feature cache entries past the size cap ($SSL_HYBRID_CACHE_MAX_GB)",
                   did="the least recently used entries are deleted after a write; the entry just written and "
                       "recently read ones stay",
                   lost="the evicted entries (re-extracted when needed)")
def test_the_cache_evicts_the_least_recently_used_entries_above_its_cap(labeled_pair, tmp_path, monkeypatch):
    train = load_labeled(labeled_pair[0])
    model = TinyBackbone()
    a, b, c = (train.subset(range(start, start + 4)) for start in (0, 4, 8))
    entries = []
    for labeled, used in ((a, 1_000_000), (b, 2_000_000)):
        cached_features(model, {"hash": "h"}, labeled, 32, batch_size=4, cache_dir=tmp_path)
        entries.append(next(e for e in tmp_path.glob("*.npz") if e not in entries))
        os.utime(entries[-1], (used, used))  # b used after a
    cached_features(model, {"hash": "h"}, a, 32, batch_size=4, cache_dir=tmp_path)  # a read: now the most recent
    monkeypatch.setenv("SSL_HYBRID_CACHE_MAX_GB", str(2.5 * entries[0].stat().st_size / 2**30))  # room for two
    cached_features(model, {"hash": "h"}, c, 32, batch_size=4, cache_dir=tmp_path)
    left = set(tmp_path.glob("*.npz"))
    assert len(left) == 2 and entries[0] in left and entries[1] not in left


@pytest.mark.fault(injected="ranks whose caches differ (node-local cache folders: rank 0 has the entry, rank 1 "
                            "has none or a corrupt one)",
                   did="rank 0 alone reads the cache and broadcasts what it found: no rank starts a collective "
                       "extraction the others skip (no hang)",
                   lost="nothing")
def test_rank_zero_decides_the_cache_and_broadcasts_it(labeled_pair, tmp_path, monkeypatch):
    train = load_labeled(labeled_pair[0]).subset(range(4))
    model = TinyBackbone()
    expected, labels = cached_features(model, {"hash": "h"}, train, 32, batch_size=4, cache_dir=tmp_path / "rank0")
    broadcasts = []

    def broadcast_object_list(objects, from_process=0):  # what rank 0 sent, as the collective delivers it
        assert from_process == 0 and objects == [None]
        broadcasts.append(True)
        return [(expected, labels)]

    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast_object_list)
    rank1 = type("Rank1", (), {"num_processes": 2, "is_main_process": False, "device": torch.device("cpu")})()
    node_local = tmp_path / "rank1"  # this node's cache: a corrupt entry under the same key
    node_local.mkdir()
    (node_local / _one_entry(tmp_path / "rank0").name).write_bytes(b"junk")
    calls = model.calls
    got, got_labels = cached_features(model, {"hash": "h"}, train, 32, batch_size=4, cache_dir=node_local,
                                      accelerator=rank1)
    assert broadcasts == [True] and model.calls == calls
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_labels, labels)
