"""Checkpoint -> ``backbone.safetensors`` + ``backbone.json`` (the student backbone only), so any
checkpoint of a run, not just its end, can be evaluated or fine-tuned."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import yaml
from safetensors.torch import load_file

from ssl_hybrid.config import from_dict
from ssl_hybrid.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def resolve_checkpoint(path: Path) -> Path:
    """A step directory as given, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / ckpt.MODEL_FILE).exists():
        return path
    newest = ckpt.latest_checkpoint(path)
    if newest is None:
        raise ckpt.CheckpointError(f"{path}: neither a checkpoint directory nor a run with complete "
                                   "checkpoints/step_*/ (each holding model.safetensors + state.pt)")
    return newest


def export_checkpoint(path: Path, out_dir: Optional[Path] = None) -> Path:
    """Write the checkpoint's student backbone to ``out_dir`` (default: the checkpoint directory)."""
    from ssl_hybrid.models.export import CHECKPOINT_BACKBONE_PREFIX, save_backbone
    from ssl_hybrid.models.factory import check_factory_args
    from ssl_hybrid.train.loop import build_backbone, model_kwargs, training_meta

    step_dir = resolve_checkpoint(path)
    config_file = step_dir / "config.yaml"
    if not config_file.exists():
        raise ckpt.CheckpointError(f"{step_dir}: no config.yaml, cannot tell which backbone it holds")
    config = from_dict(yaml.safe_load(config_file.read_text(encoding="utf-8")), source=str(config_file))
    config.model.drop_path_rate = 0.0  # inference copy; weights are independent of it
    # The checkpoint's config.yaml is a file like any other: it may only name the model class's own arguments.
    check_factory_args(config.model.name, dict(model_kwargs(config), drop_path_rate=0.0), str(config_file))
    backbone = build_backbone(config)
    weights = load_file(str(step_dir / ckpt.MODEL_FILE))
    state = {k[len(CHECKPOINT_BACKBONE_PREFIX):]: v for k, v in weights.items()
             if k.startswith(CHECKPOINT_BACKBONE_PREFIX)}
    ckpt.load_model_state(backbone, state, step_dir)
    step = int(step_dir.name.split("_")[1]) if step_dir.name.startswith("step_") else None
    weights_path, _ = save_backbone(backbone, out_dir or step_dir,
                                    dict(training_meta(config), step=step, checkpoint=str(step_dir)))
    log.info("exported %s (step %s)", weights_path, step)
    return weights_path
