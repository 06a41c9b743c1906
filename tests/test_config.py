"""Typed config: defaults, recipe + override layering, and every malformed-config case."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_hybrid import config as cfg
from ssl_hybrid.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_validate_and_every_field_has_a_reason():
    config = cfg.load_config()
    assert config.model.name == "resvit_tiny"
    assert config.train.output_dir == "runs"
    rows = cfg.describe_fields()
    missing = [key for key, _, reason in rows if not reason]
    assert not missing, f"fields without a one-line reason: {missing}"
    assert {"name", "data.train", "train.steps", "optim.lr", "train.max_seconds"} <= {k for k, _, _ in rows}


def test_recipe_then_overrides_layering(tmp_path):
    recipe = write(tmp_path / "r.yaml", "name: exp\ntrain:\n  steps: 50\n  batch_size: 32\noptim:\n  lr: 1.0e-3\n")
    config = cfg.load_config(recipe, ["train.steps=7", "data.num_workers=0"])
    assert config.name == "exp"
    assert config.train.steps == 7  # override beats recipe
    assert config.train.batch_size == 32  # recipe beats default
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.data.num_workers == 0


def test_derived_values_in_one_place():
    config = cfg.load_config(None, ["train.batch_size=512", "optim.lr=1e-3", "train.steps=1000",
                                    "optim.warmup_fraction=0.05"])
    derived = cfg.derived_values(config, num_processes=4)
    assert derived["effective_lr"] == pytest.approx(2e-3)
    assert derived["warmup_steps"] == 50
    assert derived["per_process_batch_size"] == 128


def test_roundtrip_through_dict_and_yaml(tmp_path):
    config = cfg.load_config(None, ["name=abc", "objective.mask_ratio=0.6"])
    again = cfg.from_dict(cfg.to_dict(config))
    assert again == config
    path = cfg.write_config(config, tmp_path)
    assert cfg.load_config(path) == config


@pytest.mark.parametrize("text, key", [
    ("train:\n  stpes: 5\n", "train.stpes"),          # typo in a nested key
    ("trian:\n  steps: 5\n", "trian"),                # typo in a group name
    ("model:\n  name: x\n  attn: global\n", "model.attn"),
])
def test_unknown_keys_in_recipe_name_file_and_key(tmp_path, text, key):
    recipe = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        cfg.load_config(recipe)
    message = str(err.value)
    assert str(recipe) in message and key in message and "unknown key" in message
    assert "\n" not in message


@pytest.mark.parametrize("override, key", [
    ("train.stpes=5", "train.stpes"),
    ("optim.lr=fast", "optim.lr"),                # wrong type
    ("train.steps=1.5", "train.steps"),           # float for an int
    ("data.resampled=maybe", "data.resampled"),
    ("optim.lr=-0.1", "optim.lr"),                # inconsistent values
    ("objective.mask_ratio=1.0", "objective.mask_ratio"),
    ("objective.mask_ratio=-0.2", "objective.mask_ratio"),
    ("data.image_size=100", "data.image_size"),
    ("model.attn_mode=dense", "model.attn_mode"),
    ("train.steps=0", "train.steps"),
    ("data.simclr_min_scale=0", "data.simclr_min_scale"),
    ("data.simclr_blur=1.5", "data.simclr_blur"),
    ("data.simclr_color_jitter=-0.1", "data.simclr_color_jitter"),
    ("data.simclr_hue=0.6", "data.simclr_hue"),
    ("data.simclr_grayscale=-0.1", "data.simclr_grayscale"),
    ("optim.transformer_lr_scale=0", "optim.transformer_lr_scale"),
    ("eval.pooling=max", "eval.pooling"),
    ("eval.shots=[0,5]", "eval.shots"),
    ("eval.methods=[svm]", "eval.methods"),
    ("eval.fewshot_protocol=all", "eval.fewshot_protocol"),
    ("eval.knn_protocol=all", "eval.knn_protocol"),
    ("eval.linear_holdout=1.0", "eval.linear_holdout"),
    ("eval.seeds=0", "eval.seeds"),
    ("data.worker_nice=20", "data.worker_nice"),
    ("data.worker_nice=-2", "data.worker_nice"),
    ("data.augment_on=gpu", "data.augment_on"),
])
def test_bad_overrides_name_key(override, key):
    with pytest.raises(ConfigError) as err:
        cfg.load_config(None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_simclr_local_crops_must_be_smaller_than_the_global_ones():
    multicrop = ["data.views=simclr", "data.num_local_views=4", "data.simclr_min_scale=0.25"]
    with pytest.raises(ConfigError, match="data.simclr_local_min_scale"):
        cfg.load_config(None, [*multicrop, "data.simclr_local_min_scale=0.3"])
    assert cfg.load_config(None, [*multicrop, "data.simclr_local_min_scale=0.05"]).data.num_local_views == 4
    for size in (40, 96):  # not a multiple of 16; larger than the global views
        with pytest.raises(ConfigError, match="data.local_image_size"):
            cfg.load_config(None, [*multicrop, "data.image_size=64", f"data.local_image_size={size}"])
    # without local crops the local scale and size are unused and not judged
    assert cfg.load_config(None, ["data.local_image_size=40"]).data.local_image_size == 40
    assert cfg.load_config(None, ["data.views=simclr", "data.simclr_min_scale=0.04"]).data.simclr_min_scale == 0.04


@pytest.mark.parametrize("override, suggestion", [
    ("train.stpes=5", "train.steps"),             # a typo in the key
    ("trian.steps=5", "train"),                   # a typo in the group
    ("data.image_sz=32", "data.image_size"),
    ("name_=x", "name"),
    ("optim.learning_rate=1e-3", None),           # nothing close within optim: no wild guess
])
def test_unknown_keys_suggest_the_nearest_key(override, suggestion):
    with pytest.raises(ConfigError) as err:
        cfg.load_config(None, [override])
    message = str(err.value)
    key = override.split("=")[0] if suggestion != "train" else "trian"
    if suggestion is None:
        assert message.endswith(f"unknown key '{key}'")
    else:
        assert message.endswith(f"unknown key '{key}' — did you mean '{suggestion}'?")


def test_recipe_typos_suggest_the_nearest_key_too(tmp_path):
    recipe = write(tmp_path / "typo.yaml", "objective:\n  mask_ration: 0.5\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'objective.mask_ration' — did you mean "
                                          r"'objective.mask_ratio'\?"):
        cfg.load_config(recipe)


def test_wrong_type_in_recipe_names_file(tmp_path):
    recipe = write(tmp_path / "types.yaml", "train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"types\.yaml.*train\.batch_size"):
        cfg.load_config(recipe)


@pytest.mark.fault(injected="a recipe path that is missing, a directory, not UTF-8, or malformed YAML",
                   did="exit 2 with one line naming the file",
                   lost="nothing (nothing starts)")
def test_missing_directory_non_utf8_and_malformed_recipes(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cfg.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        cfg.load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError, match="binary.yaml"):
        cfg.load_config(binary)
    malformed = write(tmp_path / "malformed.yaml", "train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed\.yaml: malformed YAML at line \d+"):
        cfg.load_config(malformed)
    scalar = write(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        cfg.load_config(scalar)


def test_batch_must_divide_across_processes():
    config = cfg.load_config(None, ["train.batch_size=64"])
    cfg.validate(config, num_processes=4)
    with pytest.raises(ConfigError, match="train.batch_size.*divisible.*3"):
        cfg.validate(config, num_processes=3)


def test_grad_accumulation_refused_for_simclr():
    with pytest.raises(ConfigError, match="grad_accum_steps.*SimCLR"):
        cfg.load_config(None, ["objective.simclr_weight=1.0", "train.grad_accum_steps=2"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        cfg.load_config(None, ["train.steps"])


def test_empty_override_means_empty_string():
    assert cfg.load_config(None, ["data.val=/some/where", "data.val="]).data.val == ""

