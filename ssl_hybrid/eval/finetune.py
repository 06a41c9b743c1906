"""Few-label fine-tuning: the whole backbone + a linear head, with layer-wise lr decay (BEiT/MAE).

Layer ids come from the backbone's ``group_matcher`` through timm's ``param_groups_layer_decay``; the
head is one layer above the top block, so block ``i`` of ``L`` trains at lr * decay ** (L - i) and the
head at the full lr. Training uses the same Accelerate machinery as pretraining (one process or many,
mixed precision on GPUs), light augmentation (random resized crop + flip), label smoothing, a warm-up +
cosine schedule, and early stopping on a stratified validation split carved out of the training set:
the best epoch's weights are restored before the test set is scored, and saved (``save_dir``) as a model
folder: the backbone with the trained head as its timm classifier, the class names (``label_names``) and
the evaluation preprocessing, so ``timm.create_model("local-dir:<folder>", pretrained=True)`` classifies.

The schedule is pretraining's (``train.schedules.warmup_cosine``, one value per optimizer step): lr 0 at
the first step, rising linearly to the peak over ``warmup_fraction`` of the steps, then cosine to 0 at the
last step. (Before it shared that function, fine-tuning started the warm-up at peak / warmup_steps and
stopped the cosine one step short of 0.)
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ssl_hybrid.data.labeled import LabeledSet, stratified_holdout
from ssl_hybrid.eval.features import (
    NonFiniteError,
    embed,
    eval_transform,
    extract_features,
    make_loader,
    one_line_worker_errors,
)
from ssl_hybrid.eval.knn import topk_accuracy
from ssl_hybrid.models.contract import TimmModel
from ssl_hybrid.schedules import warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    # Upper bound on epochs; early stopping usually ends sooner.
    epochs: int = 30
    # Small batches: few-label sets have a few hundred images.
    batch_size: int = 32
    # AdamW peak lr for the head (blocks below get lr * layer_decay ** depth-from-top).
    lr: float = 1e-3
    # 0.75 is MAE's fine-tuning value for ViT-B; 1.0 = off.
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    # Label smoothing regularizes the head when each class has a handful of images.
    label_smoothing: float = 0.1
    # Share of each class held out for early stopping.
    val_fraction: float = 0.2
    # Stop after this many epochs without a better validation accuracy.
    patience: int = 5
    # Linear warm-up share of the steps, then cosine decay to 0.
    warmup_fraction: float = 0.1
    # Random-resized-crop scale range; (0.35, 1) keeps most of a fine-grained object in view.
    crop_min_scale: float = 0.35
    seed: int = 0
    num_workers: int = 0
    # no | bf16 | fp16 (Accelerate); fp32 on CPU.
    mixed_precision: str = "no"


class Classifier(nn.Module):
    """Backbone features -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        # the width of embed(): timm's head_hidden_size where a model's pre-logits differ from its tokens
        width = getattr(backbone, "head_hidden_size", cast(TimmModel, backbone).num_features)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init: start from ~uniform predictions
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(embed(self.backbone, images))  # [B, classes]


def train_transform(image_size: int, min_scale: float):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def layer_decay_param_groups(model: Classifier, settings: FinetuneSettings) -> list[dict]:
    """Param groups with an explicit ``lr`` each: backbone groups from group_matcher, head at full lr."""
    from timm.optim import param_groups_layer_decay

    backbone = cast(TimmModel, model.backbone)
    no_decay = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    groups = param_groups_layer_decay(
        model.backbone,
        weight_decay=settings.weight_decay,
        no_weight_decay_list=no_decay,
        layer_decay=settings.layer_decay,
    )
    for group in groups:
        # The head sits one layer above the backbone's top group.
        group["lr_scale"] = group["lr_scale"] * settings.layer_decay
        group["lr"] = settings.lr * group["lr_scale"]
    groups.append(
        {"params": [model.head.weight], "weight_decay": settings.weight_decay, "lr_scale": 1.0, "lr": settings.lr}
    )
    groups.append({"params": [model.head.bias], "weight_decay": 0.0, "lr_scale": 1.0, "lr": settings.lr})
    return groups


def lr_factors(total_steps: int, warmup_fraction: float) -> np.ndarray:
    """Per-step multiplier of every group's lr: pretraining's ``train.schedules.warmup_cosine`` with peak 1,
    from 0 at step 0 up to 1 after the warm-up, then cosine to 0 at the last step."""
    warmup = max(1, int(warmup_fraction * total_steps))
    return warmup_cosine(1.0, 0.0, total_steps, warmup)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    factors = lr_factors(max(1, total_steps), warmup_fraction)
    # LambdaLR asks for one step past the end after the last optimizer step: hold the final value.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(factors[min(step, len(factors) - 1)]))


def as_timm_classifier(model: Classifier) -> nn.Module:
    """The backbone with ``model.head`` as its own classifier: ``out(x) == model(x)`` (timm's forward is
    ``head(forward_head(forward_features(x), pre_logits=True))``, what ``Classifier`` computes)."""
    out = copy.deepcopy(model.backbone).eval()
    timm_model = cast(TimmModel, out)
    timm_model.reset_classifier(model.head.out_features)
    timm_model.get_classifier().load_state_dict(model.head.state_dict())
    return out


def save_finetuned(
    model: Classifier,
    directory: Path,
    label_names: list[str],
    image_size: int,
    result: dict,
    record: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """The fine-tuned classifier as a model folder with its class names, preprocessing and scores."""
    from ssl_hybrid.models.export import save_model_folder

    best = f"best epoch {result['best_epoch']} of {result['epochs_run']}" + (
        f" by validation top-1 {result['val_top1']:.3f} on {result['n_val']} held-out images"
        if result["val_top1"] is not None
        else " (no validation split: the last epoch)"
    )
    extra = dict(
        record or {},
        image_size=image_size,
        finetuned=f"{result['n_train']} labeled images, {best}",
        test={k: result[k] for k in ("top1", "top5", "n_test")},
    )
    table = (
        "| test images | top-1 | top-5 |\n|---|---|---|\n"
        f"| {result['n_test']} | {100 * result['top1']:.1f} | {100 * result['top5']:.1f} |\n"
    )
    return save_model_folder(
        as_timm_classifier(model), directory, label_names=label_names, extra=extra, force=force, evaluation=table
    )


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


def _score(model, labeled: LabeledSet, image_size: int, settings: FinetuneSettings, accelerator, name: str) -> dict:
    loader = make_loader(labeled, eval_transform(image_size), settings.batch_size * 2, settings.num_workers)
    scores, labels = extract_features(model, loader, accelerator, forward=_logits, name=name, what="fine-tuned logits")
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5)}


def finetune(
    backbone: nn.Module,
    train_set: LabeledSet,
    test_set: LabeledSet,
    image_size: int,
    settings: FinetuneSettings | None = None,
    accelerator=None,
    save_dir: Path | None = None,
    record: dict[str, Any] | None = None,
    force: bool = False,
    name: str = "the backbone",
) -> dict:
    """Fine-tune on ``train_set`` (minus a validation split), restore the best epoch, score ``test_set``;
    with ``save_dir``, save that model there (``save_finetuned``; ``record`` describes the backbone) and
    name the folder in the result's ``model``. A non-finite training loss or non-finite logits raise
    NonFiniteError naming ``name`` on every rank."""
    from accelerate.utils import set_seed

    from ssl_hybrid.device import make_accelerator

    settings = settings or FinetuneSettings()
    accelerator = accelerator or make_accelerator(settings.mixed_precision)
    set_seed(settings.seed)
    start = time.perf_counter()
    fit_idx, val_idx = stratified_holdout(train_set.labels, settings.val_fraction, settings.seed)
    fit_set, val_set = train_set.subset(fit_idx), train_set.subset(val_idx)
    if len(val_set) == 0:
        log.warning("too few samples per class for a validation split: no early stopping, %d epochs", settings.epochs)
    model = Classifier(backbone, len(train_set.classes))
    optimizer = torch.optim.AdamW(layer_decay_param_groups(model, settings))
    loader = make_loader(
        fit_set,
        train_transform(image_size, settings.crop_min_scale),
        settings.batch_size,
        settings.num_workers,
        shuffle=True,
        seed=settings.seed,
        drop_last=len(fit_set) > settings.batch_size,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total_steps = settings.epochs * len(loader)
    scheduler = lr_scheduler(optimizer, total_steps, settings.warmup_fraction)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    history, best, best_state, stale = [], -1.0, None, 0
    for epoch in range(settings.epochs):
        loss = _train_epoch(model, loader, optimizer, scheduler, criterion, accelerator)
        if not np.isfinite(loss):
            raise NonFiniteError(
                f"{name}: the fine-tuning loss is not finite (NaN or inf) in epoch {epoch}; the "
                "backbone's weights are broken or --lr is too high"
            )
        epoch_record = {"epoch": epoch, "loss": loss, "lr": optimizer.param_groups[-1]["lr"]}
        if len(val_set):
            epoch_record["val_top1"] = _score(model, val_set, image_size, settings, accelerator, name)["top1"]
            if epoch_record["val_top1"] > best:
                best, stale = epoch_record["val_top1"], 0
                best_state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
                epoch_record["best"] = True
            else:
                stale += 1
        history.append(epoch_record)
        log.info(
            "finetune epoch %d: %s",
            epoch,
            {k: round(v, 4) if isinstance(v, float) else v for k, v in epoch_record.items()},
        )
        if len(val_set) and stale >= settings.patience:
            log.info("early stop: no better val accuracy for %d epochs", stale)
            break
    if best_state is not None:
        accelerator.unwrap_model(model).load_state_dict(best_state)
    test = _score(model, test_set, image_size, settings, accelerator, name)
    best_epoch = max((r for r in history if r.get("best")), key=lambda r: r["epoch"], default=history[-1])
    result = {
        "top1": test["top1"],
        "top5": test["top5"],
        "best_epoch": best_epoch["epoch"],
        "val_top1": best if best >= 0 else None,
        "epochs_run": len(history),
        "n_train": len(fit_set),
        "n_val": len(val_set),
        "n_test": len(test_set),
        "image_size": image_size,
        "settings": asdict(settings),
        "history": history,
        "seconds": time.perf_counter() - start,
    }
    if save_dir is not None:
        result["model"] = _save_on_main(
            accelerator,
            lambda: save_finetuned(
                accelerator.unwrap_model(model),
                Path(save_dir),
                list(train_set.classes),
                image_size,
                result,
                record,
                force,
            ),
        )
    return result


def _save_on_main(accelerator, save) -> str | None:
    """``save()`` on the main process; a failure there (a full disk: one line) stops every rank the same way."""
    from ssl_hybrid.errors import UserError

    folder, error = None, None
    if accelerator.is_main_process:
        try:
            folder = str(save())
        except UserError as err:
            error = err
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
    if float(failed.item()) > 0:
        raise error or UserError(
            f"rank {accelerator.process_index}: saving the fine-tuned model failed on the main process (see its error)"
        )
    return folder


def _train_epoch(model, loader, optimizer, scheduler, criterion, accelerator) -> float:
    model.train()
    losses = []
    batches = iter(loader)
    with one_line_worker_errors(batches):
        for images, labels, _ in batches:
            with accelerator.autocast():
                loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach().float())
    if not losses:
        return float("nan")
    # The mean over every rank's batches: the same number (and the same non-finite verdict) on every rank.
    return float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))
