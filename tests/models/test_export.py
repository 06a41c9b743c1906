"""The model folder (model.safetensors + config.json + README.md): timm's local-dir load gives the features of
``load_backbone``, classifiers keep their head and class names, writes are one unit and never replace silently."""

from __future__ import annotations

import json
import resource
import signal

import pytest
import timm
import torch

import ssl_hybrid.models  # noqa: F401  (registers hybrid_*/resvit_* with timm)
from ssl_hybrid.errors import UserError
from ssl_hybrid.models import load_backbone, load_model, save_model_folder
from ssl_hybrid.models.export import BackboneLoadError, ModelFolderError
from ssl_hybrid.models.factory import create_backbone
from tests.models.models_helpers import HYBRID_CASES, IMG

SIZE = 32


def _images(size: int = SIZE) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["hybrid_nano", "resvit_nano"])
def test_timm_local_dir_gives_the_multiscale_features_of_load_backbone(tmp_path, name):
    torch.manual_seed(0)
    model = create_backbone(name, SIZE, global_pool="multiscale").eval()
    folder = save_model_folder(model, tmp_path / "model", extra={"image_size": SIZE, "step": 3})
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ours = load_backbone(folder)
    x = _images()
    with torch.no_grad():
        expected = model.forward_multiscale(x)  # what the evaluators score with pooling=multiscale
        assert via_timm(x).shape == (2, model.num_multiscale_features)
        torch.testing.assert_close(via_timm(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(ours(x), expected, atol=0, rtol=0)
        pre_logits = via_timm.forward_head(via_timm.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pre_logits, expected, atol=0, rtol=0)
    # the preprocessing timm resolves is the evaluators' (size it was trained at, crop, bicubic, ImageNet stats)
    data = timm.data.resolve_data_config({}, model=via_timm)
    assert tuple(data["input_size"]) == (3, SIZE, SIZE) and data["crop_pct"] == 0.875
    assert data["interpolation"] == "bicubic" and data["mean"] == pytest.approx((0.485, 0.456, 0.406))
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["global_pool"] == "multiscale"
    assert config["model_args"]["global_pool"] == "multiscale" and config["num_features"] == model.num_features
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "multiscale" in card


def test_multiscale_pooling_needs_the_stage_maps_of_the_same_call():
    model = create_backbone("hybrid_nano", SIZE, global_pool="multiscale").eval()
    with torch.no_grad(), pytest.raises(ValueError, match="same forward_features call"):
        model.forward_head(torch.zeros(2, 5, model.num_features), pre_logits=True)


def test_classifier_folder_keeps_its_head_and_class_names(tmp_path):
    torch.manual_seed(1)
    model = create_backbone("hybrid_nano", SIZE, num_classes=3).eval()
    torch.nn.init.normal_(model.head.weight)  # a head that changes the logits if it were lost
    folder = save_model_folder(model, tmp_path / "clf", label_names=["cat", "dog", "owl"])
    loaded, config = load_model(folder)
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(via_timm(x), model(x), atol=0, rtol=0)
        features = load_backbone(folder)
        assert features.num_classes == 0
        torch.testing.assert_close(features(x), model.forward_head(model.forward_features(x), pre_logits=True))
    assert config["label_names"] == ["cat", "dog", "owl"] and config["num_classes"] == 3
    assert via_timm.pretrained_cfg["label_names"] == ["cat", "dog", "owl"]
    assert "pipeline_tag: image-classification" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="2 label names for a model with 3 classes"):
        save_model_folder(model, tmp_path / "bad", label_names=["cat", "dog"])


@pytest.mark.fault(
    injected="exporting onto an existing model folder (no `--force`), then with `--force`",
    did="refused with one line; with `--force` the new folder is written beside it and swapped in only when complete",
    lost="nothing",
)
def test_an_existing_model_folder_is_replaced_only_with_force(tmp_path):
    first = create_backbone("hybrid_nano", SIZE).eval()
    second = create_backbone("hybrid_nano", SIZE).eval()
    folder = save_model_folder(first, tmp_path / "model")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(ModelFolderError, match="already exists; pass --force"):
        save_model_folder(second, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    save_model_folder(second, folder, force=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(folder)(x), second(x), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old folder left


@pytest.mark.fault(
    injected="a file-size limit (RLIMIT_FSIZE, as a full disk) while writing the model folder",
    did="one line naming the folder and safetensors' error; the temp folder is removed and the "
    "existing folder is untouched",
    lost="nothing (the export is written again once there is room)",
)
def test_a_write_that_fails_midway_leaves_the_old_folder_and_no_temp_folder(tmp_path):
    small = create_backbone("hybrid_nano", SIZE).eval()
    folder = save_model_folder(small, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(
            ModelFolderError, match=r"could not write the model folder \(.*\); nothing was replaced"
        ) as err:
            save_model_folder(create_backbone("hybrid_tiny", SIZE), folder, force=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.fault(
    injected="the rename that puts a complete new model folder in place fails (--force)",
    did="one line; the existing folder is back in its place (the run folders' swap, runs.replace_dir)",
    lost="nothing",
)
def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    import os

    folder = save_model_folder(create_backbone("hybrid_nano", SIZE).eval(), tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rename = os.rename

    def failing(src, dst, *args, **kwargs):
        if ".tmp-" in os.fspath(src):
            raise OSError(28, "No space left on device")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(ModelFolderError, match="nothing was replaced"):
        save_model_folder(create_backbone("hybrid_nano", SIZE).eval(), folder, force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_old_exports_name_the_command_that_rewrites_them(tmp_path):
    (tmp_path / "backbone.json").write_text(json.dumps({"model_name": "hybrid_nano"}))
    (tmp_path / "backbone.safetensors").write_bytes(b"")
    with pytest.raises(BackboneLoadError, match=r"old format .*ssl-hybrid export <run directory>"):
        load_model(tmp_path)


# Export round trip of the backbone weights, for every variant.


@pytest.mark.parametrize("name", HYBRID_CASES)
def test_export_round_trip_identical_outputs(built, images, name, tmp_path):
    model = built[name]
    folder = save_model_folder(model, tmp_path / "export", extra={"image_size": IMG, "step": 7})
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["ssl_hybrid"]["step"] == 7
    assert config["pretrained_cfg"]["input_size"] == [3, IMG, IMG]
    assert config["num_features"] == model.num_features
    assert config["model_args"] == {"num_classes": 0, "global_pool": "token_avg", "img_size": [224, 224]}
    loaded = load_backbone(folder).eval()
    with torch.no_grad():
        expected = model.forward_features(images)
        torch.testing.assert_close(loaded.forward_features(images), expected, atol=0, rtol=0)
        if name in ("hybrid_nano", "hybrid_small"):  # the timm-only path, offline (skip rebuilding base)
            via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            torch.testing.assert_close(via_timm.forward_features(images), expected, atol=0, rtol=0)


def test_export_keeps_factory_kwargs_and_resamples_pos_embed(tmp_path):
    model = timm.create_model("hybrid_nano", img_size=96, num_classes=0, attn_mode="window", window_size=3).eval()
    save_model_folder(model, tmp_path / "m")
    loaded = load_backbone(tmp_path / "m" / "config.json")
    assert loaded.img_size == (96, 96) and loaded.attn_mode == "window" and loaded.window_size == 3
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    resized = load_backbone(tmp_path / "m", img_size=64)  # new grid: pos_embed resampled, not rejected
    assert resized.pos_embed.shape[1] == 16


def test_load_backbone_reports_missing_and_unexpected_keys(built, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = save_model_folder(built["hybrid_nano"], tmp_path / "m") / "model.safetensors"
    state = load_file(str(weights))
    state.pop("blocks.0.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(BackboneLoadError, match=r"missing keys \(1\): blocks.0.attn.qkv.weight") as err:
        load_backbone(tmp_path / "m")
    assert "unexpected keys (1): extra.weight" in str(err.value) and isinstance(err.value, UserError)
    with pytest.raises(BackboneLoadError, match="not found"):
        load_backbone(tmp_path / "nowhere")


def test_model_folder_works_for_plain_timm_models(tmp_path):
    model = timm.create_model("resnet18", num_classes=0).eval()
    save_model_folder(model, tmp_path / "m", extra={"image_size": 32})
    loaded = load_backbone(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
