"""Multi-scale pooled embedding: ours and timm CNNs get the same treatment, plain ViTs fall back, the cache
keys on the pooling, and the CLI / config expose it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import ssl_hybrid.models  # noqa: F401
from ssl_hybrid.data.labeled import load_labeled
from ssl_hybrid.eval.backbones import load_backbone_spec
from ssl_hybrid.eval.features import cached_features, embed, features_for_spec, pooling_forward
from ssl_hybrid.models.pooling import multiscale_dim, multiscale_embed, offers_multiscale


def test_resnet_multiscale_is_the_normalized_average_of_each_stage_map():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    stages = []
    hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda m, i, o: stages.append(o)) for i in (1, 2, 3, 4)]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        got = multiscale_embed(model, x)
    expected = torch.cat([F.normalize(s.mean(dim=(2, 3)), dim=-1) for s in stages], dim=-1)
    assert got.shape == (2, 64 + 128 + 256 + 512) and multiscale_dim(model) == got.shape[1]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["hybrid_nano", "resvit_nano"])
def test_ours_offer_multiscale_with_unit_norm_parts(name):
    model = timm.create_model(name, num_classes=0, img_size=32).eval()
    with torch.no_grad():
        out = pooling_forward(model, "multiscale")(model, torch.randn(3, 3, 32, 32))
    parts = 5 if name.startswith("resvit") else 4
    torch.testing.assert_close(out.norm(dim=1), torch.full((3,), parts ** 0.5))


def test_plain_vit_falls_back_to_default_pooling_and_unknown_pooling_is_refused():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    assert not offers_multiscale(vit) and pooling_forward(vit, "multiscale") is embed
    with pytest.raises(ValueError, match="pooling must be one of"):
        pooling_forward(vit, "max")


def test_cache_keys_on_pooling_and_meta_records_it(labeled_pair, tmp_path):
    train = load_labeled(labeled_pair[0])
    meta_ms, [(multi, _)] = features_for_spec("random:resvit_nano", [train], 32, cache_dir=tmp_path)
    meta_d, [(default, _)] = features_for_spec("random:resvit_nano", [train], 32, cache_dir=tmp_path, pooling="default")
    assert meta_ms["pooling"] == "multiscale" and meta_d["pooling"] == "default"
    assert multi.shape[1] == 240 and default.shape[1] == 64 and len(list(tmp_path.glob("*.npz"))) == 2
    model, meta = load_backbone_spec("random:resvit_nano", image_size=32)
    again, _ = cached_features(model, meta, train, 32, cache_dir=tmp_path, pooling="multiscale")
    np.testing.assert_array_equal(again, multi)  # from the cache, same rows


def test_knn_cli_takes_pooling(labeled_pair, capsys, tmp_path):
    from ssl_hybrid.cli import main

    train, test = labeled_pair
    args = ["knn", "random:resnet18", "--train", str(train), "--test", str(test), "--image-size", "32",
            "--workers", "0", "--cache-dir", str(tmp_path), "--pooling", "default", "--out", str(tmp_path / "k.json")]
    assert main(args) == 0
    assert json.loads((tmp_path / "k.json").read_text())["backbone"]["num_features"] == 512
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse choices: a usage error, exit 2
        main(args[:-4] + ["--pooling", "max"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
