"""Feature extraction: order and row count, the on-disk cache, multi-process padding trimmed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_hybrid.data.labeled import load_labeled
from ssl_hybrid.eval.backbones import load_backbone_spec
from ssl_hybrid.eval.features import (
    cached_features,
    embed,
    eval_transform,
    extract_features,
    is_main_process,
    make_loader,
)


def test_features_are_in_dataset_order_with_exactly_n_rows(labeled_pair):
    train = load_labeled(labeled_pair[0])
    model, meta = load_backbone_spec("random:hybrid_nano", image_size=32)
    loader = make_loader(train, eval_transform(32), batch_size=5, num_workers=0)  # 18 = 5+5+5+3
    features, labels = extract_features(model, loader)
    assert features.shape == (18, meta["num_features"]) and features.dtype == np.float32
    np.testing.assert_array_equal(labels, train.labels)
    transform = eval_transform(32)
    with torch.no_grad():
        direct = embed(model, transform(train.load_image(7))[None])[0].numpy()
    np.testing.assert_allclose(features[7], direct, rtol=1e-4, atol=1e-5)


def test_eval_transform_resizes_and_center_crops():
    from PIL import Image

    out = eval_transform(32)(Image.new("RGB", (90, 40)))
    assert out.shape == (3, 32, 32)


class CountingBackbone(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.num_features = inner, 0, inner.num_features

    def forward_features(self, x):
        self.calls += 1
        return self.inner.forward_features(x)

    def forward_head(self, x, pre_logits=False):
        return self.inner.forward_head(x, pre_logits=pre_logits)


def test_cache_hit_skips_extraction_and_keys_on_backbone_data_and_transform(labeled_pair, tmp_path):
    train = load_labeled(labeled_pair[0])
    inner, meta = load_backbone_spec("random:resnet10t", image_size=32)
    model = CountingBackbone(inner)
    first = cached_features(model, meta, train, 32, batch_size=8, cache_dir=tmp_path / "c")
    calls = model.calls
    second = cached_features(model, meta, train, 32, batch_size=8, cache_dir=tmp_path / "c")
    assert model.calls == calls  # served from disk
    np.testing.assert_array_equal(first[0], second[0])
    cached_features(model, meta, train, 48, batch_size=8, cache_dir=tmp_path / "c")  # other transform
    assert model.calls > calls
    calls = model.calls
    cached_features(model, dict(meta, hash="another-backbone"), train, 32, batch_size=8, cache_dir=tmp_path / "c")
    assert model.calls > calls
    calls = model.calls
    cached_features(model, meta, train.subset(range(10)), 32, batch_size=8, cache_dir=tmp_path / "c")  # other data
    assert model.calls > calls
    assert len(list((tmp_path / "c").glob("*.npz"))) == 4


DIST_SCRIPT = r"""
import sys, numpy as np, torch
from pathlib import Path
from accelerate import Accelerator
from ssl_hybrid.data.labeled import load_labeled
from ssl_hybrid.eval.backbones import load_backbone_spec
from ssl_hybrid.eval.features import NonFiniteError, cached_features, eval_transform, extract_features, make_loader
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2
rank, work = accelerator.process_index, Path(sys.argv[3])
labeled = load_labeled(sys.argv[1])
model, _ = load_backbone_spec("random:resnet10t", image_size=32)
loader = make_loader(labeled, eval_transform(32), batch_size=4, num_workers=0)
features, labels = extract_features(model, loader, accelerator)
if accelerator.is_main_process:
    np.savez(sys.argv[2], features=features, labels=labels)
# Node-local caches: rank 0's holds the entry, rank 1's has none. Rank 0's answer must reach rank 1.
cached, _ = cached_features(model, {"hash": "h"}, labeled, 32, batch_size=4, cache_dir=work / f"cache{rank}",
                            accelerator=accelerator)
np.save(work / f"cached{rank}.npy", cached)
with torch.inference_mode():  # the parameters are inference tensors after the cached extraction
    next(model.parameters()).view(-1)[0] = float("nan")
try:
    extract_features(model, loader, accelerator, name="nan-model")
    (work / f"refused{rank}.txt").write_text("scored")
except NonFiniteError as err:
    (work / f"refused{rank}.txt").write_text(str(err))
accelerator.end_training()
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.fault(injected="two ranks whose feature caches differ (node-local folders: rank 0 has the entry, rank 1 "
                            "none), then a backbone made NaN, under torchrun",
                   did="rank 0 decides the cache and broadcasts the features (no rank starts an extraction the other "
                       "skips: no hang); both ranks refuse the NaN features with the same one line",
                   lost="nothing")
def test_two_processes_give_exactly_the_single_process_bank(labeled_pair, tmp_path, free_port):
    train = load_labeled(labeled_pair[0]).subset(range(11))  # 11 rows: 2 ranks x batch 4 pad duplicates
    folder = tmp_path / "eleven"
    for sample in train.samples:
        target = folder / sample.id
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(sample.path).read_bytes())
    script = tmp_path / "dist_features.py"
    script.write_text(DIST_SCRIPT)
    model, _ = load_backbone_spec("random:resnet10t", image_size=32)
    cached_features(model, {"hash": "h"}, load_labeled(folder), 32, batch_size=4, cache_dir=tmp_path / "cache0")
    entry = next((tmp_path / "cache0").glob("*.npz"))
    with np.load(entry) as stored:  # marked content: only rank 0's entry can be the source of what rank 1 gets
        np.savez(entry, **{**{name: stored[name] for name in stored.files},
                           "features": np.full_like(stored["features"], 7.0)})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
                    str(script), str(folder), str(tmp_path / "out.npz"), str(tmp_path)], check=True, env=env,
                   timeout=240, capture_output=True)
    got = np.load(tmp_path / "out.npz")
    expected, labels = extract_features(model, make_loader(load_labeled(folder), eval_transform(32), 4, 0))
    assert got["features"].shape == (11, model.num_features)
    np.testing.assert_allclose(got["features"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["labels"], labels)
    for rank in (0, 1):
        assert (np.load(tmp_path / f"cached{rank}.npy") == 7.0).all()
    refusals = [(tmp_path / f"refused{rank}.txt").read_text() for rank in (0, 1)]
    assert refusals[0] == refusals[1] and refusals[0].startswith("nan-model: its features are not finite")
    assert not list((tmp_path / "cache1").glob("*.npz"))  # rank 1 neither extracted nor wrote


def test_main_process_check_asks_accelerate(monkeypatch):
    from accelerate import PartialState

    assert is_main_process() and PartialState().num_processes == 1  # one plain process is the main one
    monkeypatch.setenv("RANK", "0")  # a stray launcher variable does not decide it: accelerate's state does
    monkeypatch.setattr(PartialState, "is_main_process", property(lambda self: False))
    assert not is_main_process()


def test_an_unreadable_image_in_a_dataloader_worker_is_one_line_naming_the_file(labeled_pair):
    from ssl_hybrid.data.labeled import LabeledDataError

    bad = labeled_pair[0] / "class_1" / "img_002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    train = load_labeled(labeled_pair[0])  # not checked, so a worker process meets the bad file
    model, _ = load_backbone_spec("random:hybrid_nano", image_size=32)
    loader = make_loader(train, eval_transform(32), batch_size=4, num_workers=1)
    with pytest.raises(LabeledDataError) as err:
        extract_features(model, loader)
    message = str(err.value)
    assert message.startswith(f"{bad}: not a readable image")
    assert "\n" not in message and "Traceback" not in message and "worker" not in message


def test_worker_error_line_keeps_the_original_message_only():
    from ssl_hybrid.eval.features import worker_error_line

    wrapped = ("Caught LabeledDataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise LabeledDataError(msg)\n'
               "ssl_hybrid.data.labeled.LabeledDataError: /data/a/b.jpg: not a readable image (OSError: x: y)\n")
    assert worker_error_line(wrapped) == "/data/a/b.jpg: not a readable image (OSError: x: y)"
    assert worker_error_line("plain: message") == "plain: message"
