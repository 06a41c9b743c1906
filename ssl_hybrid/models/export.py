"""The model folder timm and the Hugging Face Hub read, its writer and its readers.

A model folder holds ``model.safetensors`` (the model's own state dict), ``config.json`` (timm's layout:
``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``model_args`` = the factory kwargs,
``pretrained_cfg`` with input size, mean/std, crop and interpolation, ``label_names`` for classifiers, and
under ``ssl_hybrid`` what this tool recorded: run, step, pretraining budget, the token pooling the
evaluators use) and ``README.md`` (a model card). After ``import ssl_hybrid.models`` it loads with
``timm.create_model("local-dir:<folder>", pretrained=True)``, and ``huggingface_hub.upload_folder`` publishes
it unchanged.

``save_model_folder`` writes one (into a temp folder, renamed when complete; an existing folder is replaced
only with ``force``); ``load_model`` rebuilds the model exactly as saved, ``load_backbone`` its features.

A trainer checkpoint still describes its backbone with ``backbone.json`` (``make_meta`` + ``write_meta``).
Exports written before the model folder were ``backbone.safetensors`` + ``backbone.json``;
``load_backbone`` and the evaluators still read them (``read_meta``, old key names upgraded by
``upgrade_meta``); ``ssl-hybrid export RUN`` re-exports a run as a model folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_hybrid.errors import UserError
from ssl_hybrid.models.factory import ModelArgsError, check_factory_args, create_model_from_file_args

log = logging.getLogger(__name__)

# The model folder (timm / Hugging Face names).
MODEL_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
RECORD_KEY = "ssl_hybrid"  # config.json section with what this tool recorded (run, step, pretraining, ...)
# A trainer checkpoint: its weights hold the student backbone under this prefix; backbone.json says how to build it.
CHECKPOINT_WEIGHTS_NAME = MODEL_WEIGHTS_NAME
CHECKPOINT_BACKBONE_PREFIX = "backbone."
META_NAME = "backbone.json"
FORMAT_VERSION = 1
# The export before the model folder: backbone.safetensors + backbone.json (read, never written).
LEGACY_WEIGHTS_NAME = "backbone.safetensors"
# Regularization rates change training, not the function a saved model computes: not recorded.
_TRAINING_ONLY_ARGS = {
    "drop_rate",
    "drop_path_rate",
    "attn_drop_rate",
    "proj_drop_rate",
    "drop_block_rate",
    "pretrained",
}


class BackboneLoadError(UserError):
    """A saved backbone is missing, malformed, or does not match the architecture it names."""


# ------------------------------------------------------------------------------------------- writing


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "model_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError("cannot tell which timm model this is (no model_name / pretrained_cfg['architecture'])")
    return name


def _factory_kwargs(model: nn.Module) -> dict[str, Any]:
    kwargs = getattr(model, "factory_kwargs", None)
    if kwargs is None:  # built outside models.factory: the class count is the one argument we can recover
        kwargs = {"num_classes": getattr(model, "num_classes", 0)}
    return json.loads(json.dumps(kwargs, default=list))  # tuples -> lists, fail early on non-JSON values


def make_meta(model: nn.Module, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``backbone.json`` content for ``model``: how to rebuild it, plus ``extra_meta``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    img_size = getattr(model, "img_size", None) or cfg.get("input_size", [0, 0, 0])[-2:]
    return dict(
        format_version=FORMAT_VERSION,
        model_name=_model_name(model),
        factory_kwargs=_factory_kwargs(model),
        img_size=list(img_size),
        num_features=int(getattr(model, "num_features", 0)),
        **(extra_meta or {}),
    )


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- model folder


class ModelFolderError(UserError):
    """A model folder that cannot be written (exists without force, disk full, ...)."""


def model_args(model: nn.Module) -> dict[str, Any]:
    """The factory kwargs that rebuild ``model`` as it is now (class count, pooling, image size included)."""
    args = {k: v for k, v in _factory_kwargs(model).items() if k not in _TRAINING_ONLY_ARGS}
    args["num_classes"] = int(getattr(model, "num_classes", args.get("num_classes", 0)))
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # timm CNNs keep a pooling module
    if isinstance(pool, str):
        args["global_pool"] = pool
    img_size = getattr(model, "img_size", None)
    if img_size is not None:  # models that take img_size keep it
        args["img_size"] = list(img_size)
    return json.loads(json.dumps(args, default=list))


def _input_size(model: nn.Module, args: dict[str, Any], image_size: int | None) -> list[int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = image_size or getattr(model, "img_size", None) or cfg.get("input_size", (3, 224, 224))[-2:]
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return [int(args.get("in_chans") or cfg.get("input_size", (3,))[0]), int(height), int(width)]


def pretrained_cfg(
    model: nn.Module, args: dict[str, Any], image_size: int | None = None, license: str = "other"
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for the saved weights: the preprocessing the evaluators use (resize to
    size / crop_pct, bicubic, center crop, ImageNet mean/std) at the size the model was trained at."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ssl_hybrid.models.contract import EVAL_CROP_PCT

    source = getattr(model, "pretrained_cfg", None) or {}
    kept = {k: source[k] for k in ("first_conv", "classifier", "fixed_input_size") if k in source}
    return json.loads(
        json.dumps(
            dict(
                kept,
                input_size=_input_size(model, args, image_size),
                mean=list(IMAGENET_DEFAULT_MEAN),
                std=list(IMAGENET_DEFAULT_STD),
                crop_pct=EVAL_CROP_PCT,
                crop_mode="center",
                interpolation="bicubic",
                num_classes=args["num_classes"],
                license=license,
            ),
            default=list,
        )
    )


def model_config(
    model: nn.Module, label_names: Sequence[str] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``config.json`` of ``model``; ``extra`` (run, step, image_size, ...) goes under ``ssl_hybrid``."""
    extra = dict(extra or {})
    args = model_args(model)
    if label_names is not None and len(label_names) != args["num_classes"]:
        raise ValueError(f"{len(label_names)} label names for a model with {args['num_classes']} classes")
    config: dict[str, Any] = {
        "architecture": _model_name(model),
        "num_classes": args["num_classes"],
        "num_features": int(getattr(model, "num_features", 0)),
        "head_hidden_size": int(getattr(model, "head_hidden_size", getattr(model, "num_features", 0))),
        "model_args": args,
        "pretrained_cfg": pretrained_cfg(model, args, extra.get("image_size"), extra.pop("license", "other")),
    }
    normalization = extra.get("normalization")
    if normalization:  # N-channel pretraining: its per-channel statistics replace ImageNet's mean/std
        config["pretrained_cfg"].update(
            mean=list(normalization["mean"]), std=list(normalization["std"]), interpolation="bilinear"
        )
    if "global_pool" in args:
        config["global_pool"] = args["global_pool"]
    if label_names is not None:
        config["label_names"] = [str(name) for name in label_names]
    config[RECORD_KEY] = json.loads(json.dumps(dict(format_version=FORMAT_VERSION, **extra), default=str))
    return config


def model_card(config: dict[str, Any], evaluation: str | None = None) -> str:
    """README.md: Hub metadata (YAML front matter) and what the model is, how it was made, how to load it."""
    record = config.get(RECORD_KEY, {})
    classifier = bool(config.get("label_names"))
    task = "image-classification" if classifier else "image-feature-extraction"
    tags = ["timm", "ssl_hybrid", task] + ([] if classifier else ["self-supervised"])
    front = [
        "---",
        "library_name: timm",
        f"license: {config['pretrained_cfg'].get('license', 'other')}",
        f"pipeline_tag: {task}",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
        "",
    ]
    size = config["pretrained_cfg"]["input_size"]
    what = f"classifier over {config['num_classes']} classes" if classifier else "self-supervised backbone"
    lines = [
        f"# {record.get('run') or config['architecture']}",
        "",
        f"`{config['architecture']}` {what}, trained with ssl_hybrid at {size[1]}x{size[2]} px.",
        "",
    ]
    lines += _card_training(record)
    if evaluation:
        lines += ["## Evaluation", "", evaluation.strip(), ""]
    pooled = config.get("global_pool") == "multiscale"
    output = "class logits" if classifier else "the embedding the evaluators scored"
    lines += ["## Use", "", *(_card_use_arrays(output) if record.get("normalization") else _card_use_rgb(output))]
    if record.get("scored_pooling") == "multiscale" and not pooled:
        lines += [
            (
                "The evaluators scored the multi-scale embedding, `ssl_hybrid.models.pooling.multiscale_embed("
                "model, x)`; `model(x)` is timm's own pooling of this architecture."
            ),
            "",
        ]
    if pooled:
        lines += [
            (
                "`global_pool` is `multiscale`: `model(x)` and `forward_head(..., pre_logits=True)` return the "
                "multi-scale embedding (every stage's average, class token and patch mean, each L2-normalized). "
                'Pass `global_pool="token_avg"` for the plain token pooling.'
            ),
            "",
        ]
    return "\n".join(front + lines)


def _card_use_rgb(output: str) -> list[str]:
    return [
        "```python",
        "import timm",
        "import ssl_hybrid.models  # registers the architecture",
        "",
        'model = timm.create_model("local-dir:<this folder>", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        f"out = model(transform(image).unsqueeze(0))  # {output}",
        "```",
        "",
    ]


def _card_use_arrays(output: str) -> list[str]:
    """N-channel models: timm's PIL transform cannot hold their images, and the statistics apply to values
    scaled by the dtype's range, so the card shows the evaluators' own reader and transform."""
    return [
        "```python",
        "import timm",
        "import ssl_hybrid.models  # registers the architecture",
        "from ssl_hybrid.data.channels import ArrayEvalTransform, Normalization, read_array",
        "",
        'model = timm.create_model("local-dir:<this folder>", pretrained=True).eval()',
        "cfg = model.pretrained_cfg",
        'norm = Normalization(tuple(cfg["mean"]), tuple(cfg["std"]))',
        'transform = ArrayEvalTransform(cfg["input_size"][-1], norm, cfg["crop_pct"])',
        'with open("image.tif", "rb") as f:  # TIFF/OME-TIFF/PNG; arrays [C, H, W] of uint8, uint16 or float32',
        '    array = read_array(f.read(), "image.tif")',
        f"out = model(transform(array).unsqueeze(0))  # {output}",
        "```",
        "",
        (
            "The model takes the channels in the order it was pretrained with, each value divided by its dtype's "
            "range (uint16: 65535, uint8: 255, floats as stored) and then normalised with `pretrained_cfg`'s "
            "per-channel `mean`/`std` (`ssl_hybrid.normalization` names the channels); images are resized "
            "(shorter side to `input_size / crop_pct`, bilinear) and centre-cropped."
        ),
        "",
    ]


def _card_training(record: dict[str, Any]) -> list[str]:
    facts = []
    if record.get("data"):
        facts.append(f"- pretrained on: `{record['data']}`")
    budget = record.get("pretraining") or {}
    if record.get("step") is not None:
        planned = f" of {budget['steps']}" if budget.get("steps") else ""
        seconds = f", {budget['train_seconds']} s of training" if budget.get("train_seconds") else ""
        facts.append(f"- steps: {record['step']}{planned}{seconds}")
    if record.get("objective"):
        facts.append("- objective weights: " + ", ".join(f"{k} {v}" for k, v in record["objective"].items()))
    if record.get("finetuned"):
        facts.append(f"- fine-tuned: {record['finetuned']}")
    return ["## Training", "", *facts, ""] if facts else []


def public_source(spec: str) -> str:
    """``data.train`` as it may be published with the model: no credentials in URLs (``user:token@``, query
    strings), no local directories above the corpus (an absolute path keeps its last part). What the logs
    redact (``ssl_hybrid.logs.redact``: Authorization headers in a ``pipe:`` command, ...) is redacted here too."""
    from ssl_hybrid.logs import redact

    if "://" in spec or spec.startswith("pipe:"):
        spec = re.sub(r"//[^/@\s]+@", "//", spec)
        return redact(re.sub(r"\?[^\s'\"]*", "", spec))
    path = Path(spec)
    return path.name if path.is_absolute() else spec


def save_model_folder(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    label_names: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    evaluation: str | None = None,
) -> Path:
    """Write ``model`` as a model folder (``model.safetensors`` + ``config.json`` + ``README.md``).

    Written into a temp folder beside ``directory`` and renamed when every file is on disk, so a crash or a
    full disk leaves either no folder or the complete old one. An existing ``directory`` is refused
    (ModelFolderError) unless ``force``; then it is replaced only once the new folder is complete.
    ``evaluation``: a markdown table for the model card.
    """
    directory = Path(directory)
    if directory.exists() and not force:
        raise ModelFolderError(
            f"{directory}: already exists; pass --force to replace it "
            "(the new folder is complete before the old one is removed)"
        )
    config = model_config(model, label_names, extra)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(state, str(tmp / MODEL_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card(config, evaluation), encoding="utf-8")
        from ssl_hybrid.runs import fsync_folder, replace_dir

        fsync_folder(tmp)
        replace_dir(tmp, directory)  # puts an existing folder back when the rename fails: "nothing was replaced"
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, UserError) or not isinstance(err, Exception):
            raise
        # a full disk or a file-size limit surfaces as whatever the writer raises (SafetensorError, OSError)
        why = " ".join(str(err).split()) or type(err).__name__
        raise ModelFolderError(
            f"{directory}: could not write the model folder ({why}); nothing was replaced: free space and export again"
        ) from None
    return directory


def write_model_card(folder: str | os.PathLike, evaluation: str | None) -> Path:
    """Rewrite the folder's model card from its config.json with ``evaluation`` (temp file + rename)."""
    folder = Path(folder)
    card = model_card(read_model_config(folder), evaluation)
    from ssl_hybrid.runs import write_text_atomic

    try:
        write_text_atomic(folder / CARD_NAME, lambda handle: handle.write(card))
    except OSError as err:
        raise ModelFolderError(
            f"{folder / CARD_NAME}: could not write the model card ({err.strerror or err})"
        ) from None
    return folder / CARD_NAME


def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / MODEL_WEIGHTS_NAME).is_file()


def read_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder, checked: one line naming the folder and key when it is not one."""
    folder = Path(folder)
    if (folder / LEGACY_WEIGHTS_NAME).exists() or (folder / META_NAME).exists() and not (folder / CONFIG_NAME).exists():
        raise BackboneLoadError(
            f"{folder}: an export in the old format ({LEGACY_WEIGHTS_NAME} + {META_NAME}); "
            f"re-export the run as a model folder: ssl-hybrid export <run directory>"
        )
    if not is_model_folder(folder):
        raise BackboneLoadError(f"{folder}: not a model folder (expected {MODEL_WEIGHTS_NAME} + {CONFIG_NAME})")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BackboneLoadError(f"{folder / CONFIG_NAME}: malformed JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise BackboneLoadError(f"{folder / CONFIG_NAME}: JSON nested too deeply to be a model config") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise BackboneLoadError(f"{folder / CONFIG_NAME}: no 'architecture' naming the timm model")
    if not isinstance(config.get("model_args", {}), dict):
        raise BackboneLoadError(f"{folder / CONFIG_NAME}: 'model_args' must be an object of factory arguments")
    try:  # a file is data, never code: a plain registered name and the model class's own arguments only
        check_factory_args(config["architecture"], config.get("model_args") or {}, str(folder / CONFIG_NAME))
    except ModelArgsError as err:
        raise BackboneLoadError(str(err)) from None
    return config


def build_from_folder(
    folder: str | os.PathLike, config: dict[str, Any], *, ignore_unexpected: bool = False, **override_kwargs: Any
) -> tuple[nn.Module, list[str]]:
    """The folder's model from ``config`` (``model_args``, ``override_kwargs`` on top), weights loaded
    strictly; returns it in eval mode and the unexpected (ignored) keys."""
    weights = Path(folder) / MODEL_WEIGHTS_NAME
    args = dict(config.get("model_args") or {})
    meta = {"model_name": config["architecture"], "factory_kwargs": args}
    # rebuilt with another class count (features only: 0): the saved classifier is not part of the model
    other_head = override_kwargs.get("num_classes", args.get("num_classes")) != args.get("num_classes")
    classifier = (config.get("pretrained_cfg") or {}).get("classifier") if other_head else None
    return rebuild(
        weights,
        meta,
        ignore_unexpected=ignore_unexpected,
        drop=f"{classifier}." if classifier else None,
        **override_kwargs,
    )


def load_model(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The model exactly as saved (its classifier head when it has one), in eval mode, and its config.json."""
    folder = _folder_of(folder)
    config = read_model_config(folder)
    return build_from_folder(folder, config)[0], config


def _folder_of(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (MODEL_WEIGHTS_NAME, CONFIG_NAME):
        return path.parent
    if not path.exists():
        raise BackboneLoadError(f"{path}: not found (a model folder holds {MODEL_WEIGHTS_NAME} + {CONFIG_NAME})")
    return path


# ------------------------------------------------------------------------------------------- reading


def upgrade_meta(meta: dict[str, Any], where: str | os.PathLike) -> dict[str, Any]:
    """``meta`` in the current layout; raises when no model is named, or when the name or the factory kwargs
    are not what a file may set (:func:`ssl_hybrid.models.factory.check_factory_args`).

    The old layout (the trainer's checkpoints before this format, and files written by hand after them)
    is ``{"model": name, "image_size": px, "kwargs": {...}}``, meaning ``create_backbone(name, px, **kwargs)``:
    built at that size, without a classifier.
    """
    meta = dict(meta)
    if "model_name" not in meta and "model" in meta:
        size = {"img_size": meta["image_size"]} if meta.get("image_size") else {}
        meta["model_name"] = meta.pop("model")
        meta["factory_kwargs"] = {"num_classes": 0, **size, **(meta.pop("kwargs", None) or {})}
    if not meta.get("model_name"):
        raise BackboneLoadError(
            f"{where}: no 'model_name' key naming the timm model; "
            'write one with {"model_name": "<timm name>", "image_size": <px>}'
        )
    meta["factory_kwargs"] = dict(meta.get("factory_kwargs") or {})
    try:
        check_factory_args(meta["model_name"], meta["factory_kwargs"], str(where))  # a file is data, never code
    except ModelArgsError as err:
        raise BackboneLoadError(str(err)) from None
    return meta


def read_meta_file(meta_path: str | os.PathLike) -> dict[str, Any]:
    """One ``backbone.json``, old key names upgraded."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise BackboneLoadError(f"{meta_path}: not found (an old export is {LEGACY_WEIGHTS_NAME} + {META_NAME})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BackboneLoadError(f"{meta_path}: malformed JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise BackboneLoadError(f"{meta_path}: JSON nested too deeply to be a backbone description") from None
    if not isinstance(meta, dict):
        raise BackboneLoadError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return upgrade_meta(meta, meta_path)


def read_meta(path_or_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Resolve ``(weights_path, meta)`` from a directory, the .safetensors or the .json path."""
    path = Path(path_or_dir)
    if not path.exists():
        raise BackboneLoadError(f"{path}: not found (expected a model folder)")
    if path.is_file() and path.suffix not in (".safetensors", ".json"):
        raise BackboneLoadError(f"{path}: weights must be a .safetensors file (pickled checkpoints are not loaded)")
    directory = path if path.is_dir() else path.parent
    weights_path = path if path.suffix == ".safetensors" else directory / LEGACY_WEIGHTS_NAME
    if not weights_path.is_file():
        raise BackboneLoadError(f"{weights_path}: not found (an old export is {LEGACY_WEIGHTS_NAME} + {META_NAME})")
    return weights_path, read_meta_file(directory / META_NAME)


def load_state_strict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    where: str | os.PathLike,
    *,
    ignore_unexpected: bool = False,
    error: type[UserError] = BackboneLoadError,
) -> list[str]:
    """Load ``state`` into ``model``: every key present, every shape equal, else ``error`` naming the keys.

    ``ignore_unexpected``: keys the model does not have (e.g. a head saved alongside) are logged and
    skipped instead of refused. Returns the unexpected keys.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = (
        ("missing keys", missing),
        ("unexpected keys", [] if ignore_unexpected else unexpected),
        ("shape mismatches", mismatched),
    )
    if any(keys for _, keys in problems):
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in problems
            if keys
        ]
        raise error(f"{where}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    if unexpected:
        log.warning("%s: %d unexpected keys ignored (e.g. %s)", where, len(unexpected), ", ".join(unexpected[:3]))
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return unexpected


def _read_weights(weights_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise BackboneLoadError(f"{weights_path}: unreadable safetensors file ({err})") from None
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def rebuild(
    weights_path: Path,
    meta: dict[str, Any],
    *,
    prefix: str = "",
    ignore_unexpected: bool = False,
    drop: str | None = None,
    **override_kwargs: Any,
) -> tuple[nn.Module, list[str]]:
    """Build ``meta``'s model (its factory kwargs, ``override_kwargs`` on top) and load the weights strictly.

    ``prefix``: use only the weights under it (``CHECKPOINT_BACKBONE_PREFIX`` for a trainer checkpoint);
    ``drop``: leave out the weights under it (a classifier the rebuilt model does not have).
    The model's timm module adapts the weights first when it has a ``checkpoint_filter_fn`` (ViTs, our
    hybrids: the position embedding is resampled when ``img_size`` changes). Returns the model in eval
    mode and the unexpected keys (see ``load_state_strict``).
    """
    kwargs = {k: v for k, v in {**meta["factory_kwargs"], **override_kwargs}.items() if k != "pretrained"}
    image_size = kwargs.pop("img_size", None)
    try:
        model = create_model_from_file_args(meta["model_name"], image_size, kwargs, str(weights_path))
    except (RuntimeError, TypeError, ValueError) as err:
        raise BackboneLoadError(
            f"{weights_path}: cannot build {meta['model_name']} with {dict(kwargs, img_size=image_size)}: {err}"
        ) from err
    state = _read_weights(weights_path, prefix)
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    adapt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if adapt is not None:
        state = adapt(state, model)
    unexpected = load_state_strict(model, state, weights_path, ignore_unexpected=ignore_unexpected)
    return model.eval(), unexpected


def load_backbone(path_or_dir: str | os.PathLike, **override_kwargs: Any) -> nn.Module:
    """The features of a saved model: a model folder rebuilt without its classifier (``num_classes=0``),
    its pooling as saved; an old ``backbone.safetensors`` + ``backbone.json`` export as it was saved.

    ``override_kwargs`` replace saved factory kwargs (e.g. ``img_size=96``: the position embedding is
    resampled). Eval mode. Raises BackboneLoadError naming the missing/unexpected/mismatched keys when
    the weights do not fit the architecture.
    """
    path = Path(path_or_dir)
    folder = _folder_of(path)
    if is_model_folder(folder):
        config = read_model_config(folder)
        return build_from_folder(folder, config, **{"num_classes": 0, **override_kwargs})[0]
    weights_path, meta = read_meta(path)
    return rebuild(weights_path, meta, **override_kwargs)[0]
