"""The one backbone loader: random:/timm: specs, exported files, run directories, key reporting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ssl_hybrid.eval.backbones import BackboneError, load_backbone_spec
from ssl_hybrid.eval.features import embed


def _features(model, size=32):
    torch.manual_seed(0)
    with torch.no_grad():
        return embed(model, torch.randn(2, 3, size, size))


def test_random_spec_is_reproducible_and_sized():
    a, meta = load_backbone_spec("random:hybrid_nano", image_size=32)
    b, _ = load_backbone_spec("random:hybrid_nano", image_size=32)
    assert meta["image_size"] == 32 and meta["kind"] == "random" and meta["num_features"] == a.num_features
    torch.testing.assert_close(_features(a), _features(b))
    assert load_backbone_spec("timm:resnet10t")[1]["image_size"] == 224  # no pretraining size -> 224


@pytest.mark.slow  # a fresh interpreter importing torch and timm: seconds
def test_our_models_are_known_to_timm_after_importing_only_the_loader():
    """A fresh process: ``random:resvit_tiny`` resolves with no other ssl_hybrid import (registration rides on
    the models package import that the loader module makes)."""
    code = ("import ssl_hybrid.eval.backbones as b, sys; assert 'ssl_hybrid.models.hybrid' in sys.modules; "
            "m, meta = b.load_backbone_spec('random:resvit_tiny', image_size=32); print(type(m).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ResViT"


def test_model_folder_loads_from_dir_and_file_with_token_pooling(tmp_path):
    from ssl_hybrid.models.export import save_model_folder
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(3)
    original = create_backbone("hybrid_nano", 32).eval()
    original.global_pool = "multiscale"  # as the trainer exports: timm's model(x) is the multi-scale embedding
    save_model_folder(original, tmp_path / "model", extra={"image_size": 32, "step": 4, "token_pool": "token_avg"})
    original.global_pool = "token_avg"
    for spec in (tmp_path / "model", tmp_path / "model" / "model.safetensors"):
        model, meta = load_backbone_spec(str(spec))
        assert meta["image_size"] == 32 and meta["missing_keys"] == [] and meta["unexpected_keys"] == []
        assert meta["step"] == 4 and model.global_pool == "token_avg"  # pooling=default stays the token pooling
        torch.testing.assert_close(_features(model), _features(original))
    resized, meta = load_backbone_spec(str(tmp_path / "model"), image_size=64)  # position embeddings resampled
    assert _features(resized, 64).shape == (2, original.num_features)


@pytest.mark.fault(injected="evaluating a run folder whose export is older than its newest checkpoint",
                   did="the newest weights by step are scored (export or checkpoint; the export wins a tie) and "
                       "the result records the step and the weights file",
                   lost="nothing")
def test_a_run_folder_is_evaluated_at_its_newest_step_and_the_result_says_which(tmp_path):
    import timm

    from ssl_hybrid.eval.commands import _backbone_summary
    from ssl_hybrid.models.export import save_model_folder

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000020").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: resnet10t\ndata:\n  image_size: 32\n")
    exported, newer = timm.create_model("resnet10t", num_classes=0), timm.create_model("resnet10t", num_classes=0)
    save_model_folder(exported, run / "model", extra={"image_size": 32, "step": 10})
    save_file({f"backbone.{k}": v for k, v in newer.state_dict().items()},
              str(run / "checkpoints" / "step_00000020" / "model.safetensors"))
    model, meta = load_backbone_spec(str(run))
    assert meta["step"] == 20 and meta["weights"].endswith("step_00000020/model.safetensors")
    assert _backbone_summary(meta)["step"] == 20
    torch.testing.assert_close(_features(model.eval()), _features(newer.eval()))
    # the same for an export in the old format, read where it lies (run folders written before the model folder)
    (run / "model" / "model.safetensors").rename(run / "backbone.safetensors")
    (run / "backbone.json").write_text(json.dumps({"model_name": "resnet10t", "image_size": 32, "step": 10}))
    shutil.rmtree(run / "model")
    assert load_backbone_spec(str(run))[1]["step"] == 20
    save_model_folder(newer, run / "exports" / "step_00000020", extra={"image_size": 32, "step": 20})
    model, meta = load_backbone_spec(str(run))  # same step: the export (a model folder) is read
    assert meta["step"] == 20 and meta["weights"] == str(run / "exports" / "step_00000020" / "model.safetensors")


def test_run_directory_without_export_uses_newest_checkpoint(tmp_path):
    import timm

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000020").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: resnet10t\ndata:\n  image_size: 32\n")
    old = timm.create_model("resnet10t", num_classes=0)
    new = timm.create_model("resnet10t", num_classes=0)
    save_file({f"backbone.{k}": v for k, v in old.state_dict().items()},
              str(run / "checkpoints" / "step_00000010" / "model.safetensors"))
    save_file({f"backbone.{k}": v for k, v in new.state_dict().items()},
              str(run / "checkpoints" / "step_00000020" / "model.safetensors"))
    model, meta = load_backbone_spec(str(run))
    assert meta["weights"].endswith("step_00000020/model.safetensors") and meta["image_size"] == 32
    torch.testing.assert_close(_features(model.eval()), _features(new.eval()))


def test_missing_keys_are_an_error_and_unexpected_keys_are_reported(tmp_path):
    import timm

    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    (tmp_path / "backbone.json").write_text(json.dumps({"model_name": "resnet10t", "image_size": 32}))
    save_file(dict(state, **{"extra.head": torch.zeros(3)}), str(tmp_path / "backbone.safetensors"))
    _, meta = load_backbone_spec(str(tmp_path))
    assert meta["unexpected_keys"] == ["extra.head"]
    state.pop("conv1.0.weight")
    save_file(state, str(tmp_path / "backbone.safetensors"))
    with pytest.raises(BackboneError, match="missing"):
        load_backbone_spec(str(tmp_path))


@pytest.mark.parametrize("spec, message", [
    ("random:", "name a model"),
    ("random:no_such_model_xyz", "unknown model"),
    ("/does/not/exist", "not found"),
])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(BackboneError, match=message):
        load_backbone_spec(spec)


def test_pickled_weights_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({}, path)
    with pytest.raises(BackboneError, match="safetensors"):
        load_backbone_spec(str(path))


# Architecture kwargs that change the weights' shapes, so a loader that drops them cannot load the weights.
OLD_KWARGS = {"drop_path_rate": 0.0, "attn_mode": "window", "window_size": 2, "embed_dim": 64, "num_heads": 2,
              "depth": 2}
OLD_RECORD = {"run": "old", "objective": {"mim_weight": 1.0, "dino_weight": 1.0, "simclr_weight": 0.0}}


def _assert_same_weights(model, original):
    state, expected = model.state_dict(), original.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("layout", ["exported", "trainer"])
def test_backbone_directories_written_the_old_way_still_load(tmp_path, layout):
    """backbone.json as the exporter wrote it (model_name / factory_kwargs) and as the trainer's checkpoints
    and hand-written files did (model / kwargs / image_size), both next to backbone.safetensors."""
    from ssl_hybrid.models import load_backbone
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(5)
    original = create_backbone("hybrid_nano", 32, **OLD_KWARGS).eval()
    save_file(original.state_dict(), str(tmp_path / "backbone.safetensors"))
    if layout == "exported":
        meta = dict(OLD_RECORD, format_version=1, model_name="hybrid_nano", img_size=[32, 32], num_features=64,
                    factory_kwargs=dict(OLD_KWARGS, num_classes=0, img_size=32), image_size=32, step=5)
    else:
        meta = dict(OLD_RECORD, model="hybrid_nano", image_size=32, kwargs=OLD_KWARGS)
    (tmp_path / "backbone.json").write_text(json.dumps(meta))
    _assert_same_weights(load_backbone(tmp_path), original)
    model, info = load_backbone_spec(str(tmp_path))
    _assert_same_weights(model, original)
    assert info["model"] == "hybrid_nano" and info["image_size"] == 32 and info["unexpected_keys"] == []
    assert info["pretraining"]["run"] == "old"
    torch.testing.assert_close(_features(model), _features(original), atol=0, rtol=0)


def test_checkpoint_only_run_written_the_old_way_still_loads(tmp_path):
    """A run without an export whose checkpoint's backbone.json has the old trainer keys (model / kwargs)."""
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(6)
    original = create_backbone("hybrid_nano", 32, **OLD_KWARGS).eval()
    step = tmp_path / "run" / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    state = {f"backbone.{k}": v for k, v in original.state_dict().items()}
    state.update({"teacher.backbone.cls_token": torch.zeros(1, 1, 64), "dino_head.last.weight": torch.zeros(4, 64)})
    save_file(state, str(step / "model.safetensors"))
    (step / "backbone.json").write_text(json.dumps(dict(OLD_RECORD, model="hybrid_nano", image_size=32,
                                                        kwargs=OLD_KWARGS)))
    model, info = load_backbone_spec(str(tmp_path / "run"))
    _assert_same_weights(model, original)
    assert info["weights"].endswith("step_00000007/model.safetensors") and info["unexpected_keys"] == []
