"""Handlers behind ``ssl-hybrid knn | linear | fewshot | finetune | report`` (cli.py only parses).

Each turns parsed arguments into calls of the evaluators, prints the result and writes ``--out``.
Bad inputs (missing folders, unknown backbones, bad lists) raise UserError: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} must list integers >= 1, got '{text}'")
    return values


def str_list(text: str, flag: str, choices: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if not values or bad:
        raise UserError(f"{flag}: unknown value '{bad[0] if bad else text}' (choose from {', '.join(choices)})")
    return values


def load_pair(args: argparse.Namespace):
    """The --train and --test labeled sets, test relabeled to train's classes, every image decoded once
    before extraction (unreadable ones skipped and counted, or one error above data.max_skip_rate)."""
    from ssl_hybrid.data.labeled import align_classes, check_images, load_labeled, shared_images

    for flag in ("train", "test"):
        value = getattr(args, flag)
        if not value:
            raise UserError(f"--{flag} is required: an image folder with class sub-folders or labeled shards")
        if "{" not in value and "://" not in value and not value.startswith("pipe:") and not Path(value).exists():
            raise UserError(f"--{flag} {value}: not found")
    from ssl_hybrid.eval.backbones import native_channels

    # Images are checked with the decoder the model's loader uses (report: when its backbones agree on it).
    found = {native_channels(spec) for spec in getattr(args, "runs", None) or [args.backbone]}
    channels = found.pop() if len(found) == 1 else None
    train = check_images(load_labeled(args.train), channels=channels)
    test = align_classes(train, check_images(load_labeled(args.test), channels=channels))
    shared = shared_images(train, test)
    if shared:
        log.warning(
            "%d of the %d --test images are also in --train: each finds itself as nearest neighbour, "
            "so accuracies are inflated (use disjoint folders)",
            shared,
            len(test),
        )
    return train, test


def data_summary(train, test) -> dict[str, Any]:
    """Where the numbers come from: both sets, images skipped as unreadable, images the two share."""
    from ssl_hybrid.data.labeled import shared_images

    return {
        "train": train.source,
        "test": test.source,
        "train_images": len(train),
        "test_images": len(test),
        "num_classes": len(train.classes),
        "test_images_in_train": shared_images(train, test),
        "skipped_unreadable": {"train": train.skipped, "test": test.skipped},
    }


def cache_dir(args: argparse.Namespace) -> Path | None:
    from ssl_hybrid.eval.features import default_cache_dir

    if getattr(args, "no_cache", False):
        return None
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def features(args: argparse.Namespace, spec: str, train, test):
    from ssl_hybrid.eval.features import features_for_spec

    if args.image_size < 0:
        raise UserError(f"--image-size must be >= 0 (0 = the backbone's pretraining size), got {args.image_size}")
    meta, ((train_f, train_y), (test_f, test_y)) = features_for_spec(
        spec,
        [train, test],
        args.image_size or None,
        args.batch_size,
        args.workers,
        cache_dir(args),
        progress=sys.stderr.isatty(),
        pooling=args.pooling,
    )
    return meta, train_f, train_y, test_f, test_y


def emit(args: argparse.Namespace, result: dict[str, Any], line: str) -> None:
    """Print the result as one line; everything else (per-k, draws, data summary, backbone) goes to --out."""
    from ssl_hybrid.eval.features import is_main_process
    from ssl_hybrid.runs import write_json_atomic

    if not is_main_process():  # under accelerate launch every rank computed the same result
        return
    if args.out:
        write_json_atomic(args.out, result)
    print(f"{line} -> {args.out}" if args.out else line)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _scored(result: dict[str, Any]) -> str:
    """What the numbers were measured on, and at which size: the part of --out that a reader needs at once."""
    backbone = result["backbone"]
    return f"{result['n_test']} test images; {backbone['spec']} at {backbone['image_size']} px"


def knn_line(result: dict[str, Any]) -> str:
    return (
        f"k-NN top-1 {_pct(result['top1'])}, top-5 {_pct(result['top5'])} (k={result['k']}, "
        f"T={result['temperature']:g}, bank of {result['n_train']}; {_scored(result)})"
    )


def linear_line(result: dict[str, Any]) -> str:
    return (
        f"linear probe top-1 {_pct(result['top1'])}, top-5 {_pct(result['top5'])} (C={result['C']:g}, "
        f"{result['selection']}; {_scored(result)})"
    )


def fewshot_line(result: dict[str, Any]) -> str:
    cells = [
        f"{r['method']} {r['shots']}-shot {100 * r['mean']:.1f} ± {100 * r['std']:.1f}%" for r in result["results"]
    ]
    scored = (
        "each draw scored on the images it did not draw"
        if result["protocol"] == "rest"
        else f"{result['n_test']} test images"
    )
    backbone = result["backbone"]
    return (
        f"{', '.join(cells)} (top-1, mean ± std over {result['seeds']} draws; {scored}; {backbone['spec']} "
        f"at {backbone['image_size']} px)"
    )


def finetune_line(result: dict[str, Any]) -> str:
    return (
        f"fine-tuned top-1 {_pct(result['top1'])}, top-5 {_pct(result['top5'])} (best epoch "
        f"{result['best_epoch']} of {result['epochs_run']}; {_scored(result)})"
    )


def _backbone_summary(meta: dict) -> dict:
    from ssl_hybrid.eval.backbones import backbone_summary

    return backbone_summary(meta, "missing_keys", "unexpected_keys")


def run_knn(args: argparse.Namespace) -> int:
    from ssl_hybrid.eval.knn import knn_evaluate

    ks = int_list(args.ks, "--ks")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    train, test = load_pair(args)
    meta, train_f, train_y, test_f, test_y = features(args, args.backbone, train, test)
    result = knn_evaluate(
        train_f,
        train_y,
        test_f,
        test_y,
        ks=ks,
        temperature=args.temperature,
        headline_k=int_list(str(args.k), "--k")[0],
        num_classes=len(train.classes),
        threads=args.threads or None,
    )
    result.update(backbone=_backbone_summary(meta), **data_summary(train, test))
    emit(args, result, knn_line(result))
    return 0


def run_linear(args: argparse.Namespace) -> int:
    from ssl_hybrid.eval.linear import DEFAULT_CS, linear_probe

    if not 0 < args.holdout < 1:
        raise UserError(f"--holdout must be in (0, 1), got {args.holdout}")
    cs = DEFAULT_CS
    if args.cs:
        try:
            cs = tuple(float(v) for v in args.cs.split(","))
        except ValueError:
            raise UserError(f"--cs must be comma-separated numbers, got '{args.cs}'") from None
    train, test = load_pair(args)
    meta, train_f, train_y, test_f, test_y = features(args, args.backbone, train, test)
    result = linear_probe(
        train_f, train_y, test_f, test_y, cs=cs, holdout=args.holdout, seed=args.seed, num_classes=len(train.classes)
    )
    result.update(backbone=_backbone_summary(meta), **data_summary(train, test))
    emit(args, result, linear_line(result))
    return 0


def _split_dir(args: argparse.Namespace) -> Path:
    if args.splits_dir:
        return Path(args.splits_dir)
    if args.out:
        out = Path(args.out)
        return out.with_name(f"{out.stem}_splits")
    return Path("fewshot_splits")


def run_fewshot(args: argparse.Namespace) -> int:
    from ssl_hybrid.config import FEWSHOT_METHODS
    from ssl_hybrid.eval.features import is_main_process
    from ssl_hybrid.eval.fewshot import fewshot_evaluate

    shots = int_list(args.shots, "--shots")
    methods = str_list(args.method, "--method", FEWSHOT_METHODS)
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    train, test = load_pair(args)
    meta, train_f, train_y, test_f, test_y = features(args, args.backbone, train, test)
    if not is_main_process():  # other ranks only helped extract (a collective step); the fits are cheap
        return 0
    result = fewshot_evaluate(
        train_f,
        train_y,
        test_f,
        test_y,
        shots=shots,
        seeds=args.seeds,
        methods=methods,
        train_set=train,
        split_dir=_split_dir(args),
        num_classes=len(train.classes),
        protocol=args.fewshot_protocol,
        test_set=test,
    )
    result.update(backbone=_backbone_summary(meta), **data_summary(train, test), splits_dir=str(_split_dir(args)))
    emit(args, result, fewshot_line(result))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from ssl_hybrid.data.labeled import kshot_indices, save_split
    from ssl_hybrid.eval.backbones import load_backbone_spec
    from ssl_hybrid.eval.features import is_main_process
    from ssl_hybrid.eval.finetune import FinetuneSettings, finetune

    if args.epochs < 1 or args.patience < 1:
        raise UserError("--epochs and --patience must be >= 1")
    if not 0 < args.layer_decay <= 1:
        raise UserError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    save_dir = finetune_save_dir(args)
    train, test = load_pair(args)
    if args.shots:
        indices = kshot_indices(train.labels, args.shots, args.seed)
        if args.out and is_main_process():
            out = Path(args.out)
            save_split(
                out.with_name(f"{out.stem}_split.json"), train, indices.tolist(), shots=args.shots, seed=args.seed
            )
        train = train.subset(indices)
    model, meta = load_backbone_spec(args.backbone, image_size=args.image_size or None)
    settings = FinetuneSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        patience=args.patience,
        val_fraction=args.val_fraction,
        seed=args.seed,
        num_workers=args.workers,
        mixed_precision=args.mixed_precision,
    )
    from ssl_hybrid.models.export import public_source

    record = {"base_model": public_source(args.backbone), **(meta.get("pretraining") or {})}
    if meta.get("normalization"):  # N-channel: fine-tuned, scored and saved with the pretraining statistics
        record["normalization"] = meta["normalization"]
    result = finetune(
        model,
        train,
        test,
        int(meta["image_size"]),
        settings,
        save_dir=save_dir,
        record=record,
        force=args.force,
        name=args.backbone,
    )
    result.update(backbone=_backbone_summary(meta), **data_summary(train, test), shots=args.shots or None)
    emit(args, result, finetune_line(result))
    if result.get("model"):
        print(f"saved the fine-tuned model (best epoch {result['best_epoch']}) to {result['model']}")
    return 0


def finetune_save_dir(args: argparse.Namespace) -> Path | None:
    """Where ``finetune`` saves its model: ``--save``, refused up front when it exists without ``--force``;
    by default a new folder beside ``--out`` (``<out stem>_model``), in the run directory of a run backbone
    (``<run>/finetuned``) or ``./finetuned``, numbered (``-2``, ``-3`` ...) rather than replacing one."""
    from ssl_hybrid.models.export import is_model_folder

    if args.no_save:
        return None
    if args.save:
        save = Path(args.save)
        if save.exists() and not args.force:
            raise UserError(f"--save {save}: already exists; pass --force to replace it or choose another folder")
        return save
    backbone = Path(args.backbone)
    if args.out:
        base = Path(args.out).with_name(f"{Path(args.out).stem}_model")
    elif backbone.is_dir() and not is_model_folder(backbone):
        base = backbone / "finetuned"
    elif backbone.is_dir():
        base = backbone.with_name(f"{backbone.name}-finetuned")
    else:
        base = Path("finetuned")
    candidates = (base if n == 1 else base.with_name(f"{base.name}-{n}") for n in range(1, 10_000))
    return next(path for path in candidates if not path.exists())


def run_report(args: argparse.Namespace) -> int:
    from ssl_hybrid.config import FEWSHOT_METHODS
    from ssl_hybrid.eval.report import build_report, slug

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    if names is not None and len(names) != len(args.runs):
        raise UserError(f"--names lists {len(names)} names for {len(args.runs)} backbones")
    shots = int_list(args.shots, "--shots")
    methods = str_list(args.method, "--method", FEWSHOT_METHODS)
    train, test = load_pair(args)
    if args.baseline is not None and args.baseline not in (names or [slug(r) for r in args.runs]):
        raise UserError(
            f"--baseline '{args.baseline}' is not one of the backbone names "
            f"({', '.join(names or [slug(r) for r in args.runs])})"
        )
    report = build_report(
        args.runs,
        train,
        test,
        Path(args.out_dir),
        names=names,
        shots=shots,
        seeds=args.seeds,
        methods=methods,
        image_size=args.image_size or None,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache_dir=cache_dir(args),
        pooling=args.pooling,
        baseline=args.baseline,
        knn_protocol=args.knn_protocol,
        fewshot_protocol=args.fewshot_protocol,
    )
    from ssl_hybrid.runs import write_json_atomic

    if not report["entries"]:  # not the main process
        return 0
    if args.out:
        write_json_atomic(args.out, report)
    print(report["table"], end="")
    print(
        f"wrote {report['markdown']}, {Path(args.out_dir) / 'report.json'}, {report['plot']} and "
        f"{len(report['entries'])} retrieval grid(s)"
    )
    print(f"verdict: {report['verdict']['line']}")
    return 0
