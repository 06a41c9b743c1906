"""`ssl-hybrid` command line: thin argument parsing that calls the package's functions.

Each subcommand has an ``_add_<name>`` function that declares its arguments and sets ``handler``.
Building the parser imports no stage (no torch, timm, accelerate, lightly, faiss or webdataset): handlers
import their stage when they run, and arguments whose declaration needs a stage (a bench target's own
options, finetune's defaults) are declared by :class:`_CommandParser` only when that command is parsed or
its help is shown, so ``ssl-hybrid --help`` and ``--version`` start at once. Errors the user can fix
(:class:`~ssl_hybrid.errors.UserError`) print one line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from ssl_hybrid import __version__
from ssl_hybrid.errors import UserError
from ssl_hybrid.logs import redact, setup_logging

log = logging.getLogger("ssl_hybrid")

EXIT_USER_ERROR = 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the hand-wrapped descriptions and examples as written."""


class _CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``declare(parser)`` adds its arguments on first parse or help, not when built."""

    def __init__(self, *args, declare: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._declare = declare

    def _declare_arguments(self) -> None:
        declare, self._declare = self._declare, None
        if declare is not None:
            declare(self)

    def parse_known_args(self, args=None, namespace=None):
        self._declare_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._declare_arguments()
        return super().format_help()


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="RECIPE",
        default=None,
        help="YAML recipe overriding the defaults (see recipes/); none = defaults only",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides applied after the recipe, e.g. train.steps=200 optim.lr=1e-3",
    )


def _add_out_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", metavar="FILE.json", default=None, help=f"also write {what} to this JSON file")


def _write_out(args: argparse.Namespace, result: dict) -> None:
    """Write a command's result to --out (atomically), when given."""
    from ssl_hybrid.runs import write_json_atomic

    if args.out:
        write_json_atomic(args.out, result)
        log.info("wrote %s", args.out)


# --------------------------------------------------------------------------------------------
# config: show the resolved configuration (validates recipes without starting anything)
# --------------------------------------------------------------------------------------------


def _add_config(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "config",
        formatter_class=_HelpFormatter,
        help="print the resolved config (defaults <- recipe <- overrides) and derived values",
        description="Resolve and validate a config without running anything.\n\n"
        "examples:\n  ssl-hybrid config -c recipes/quickstart.yaml train.steps=50\n"
        "  ssl-hybrid config --explain     # every key with its default and the reason for it",
    )
    _add_recipe_args(parser)
    parser.add_argument("--explain", action="store_true", help="list every key, its default and why")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="number of training processes to check batch divisibility and derived values for",
    )
    parser.set_defaults(handler=_run_config)


def _run_config(args: argparse.Namespace) -> int:
    from ssl_hybrid import config as cfg

    if args.explain:
        for key, default, reason in cfg.describe_fields():
            print(f"{key:36s} {default!r:>24}  {reason}")
        return 0
    config = cfg.load_config(args.config, args.overrides)
    cfg.validate(config, source=args.config or "defaults", num_processes=args.num_processes)
    print(cfg.to_yaml(config), end="")
    print("# derived values")
    for key, value in cfg.derived_values(config, args.num_processes).items():
        print(f"# {key}: {value}")
    return 0


# --------------------------------------------------------------------------------------------
# bench: side-by-side measurements written as JSON (measurements only: README's benchmark table has the goals)
# --------------------------------------------------------------------------------------------

# target -> (module with run_benchmark(args) -> dict and add_arguments(parser), one-line help). Only the data
# profiler is a user tool (is my loader the bottleneck?); the model, k-NN and training-loop benchmarks are
# scripts in benchmarks/ (python benchmarks/bench_models.py, bench_eval.py, bench_train.py).
BENCH_TARGETS: dict[str, tuple[str, str]] = {
    "data": (
        "ssl_hybrid.data.bench",
        "samples/s of the full shard stream vs decode+augment from memory, 1 and 2 workers",
    ),
}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        formatter_class=_HelpFormatter,
        help="measure throughput side by side and write JSON",
        description="Benchmarks measure ratios side by side in one run (machines are noisy) and write JSON.",
    )
    targets = parser.add_subparsers(dest="target", metavar="<target>", title="targets")
    targets.required = True
    for target, (module_name, help_text) in BENCH_TARGETS.items():
        target_parser = targets.add_parser(
            target,
            formatter_class=_HelpFormatter,
            help=help_text,
            description=help_text,
            declare=_bench_arguments(module_name),
        )
        _add_out_arg(target_parser, "the measurements")
        target_parser.set_defaults(handler=_run_bench, bench_module=module_name)


def _bench_arguments(module_name: str) -> Callable[[argparse.ArgumentParser], None]:
    """The target module's own ``add_arguments`` (importing it imports torch, so only once the target is used)."""

    def declare(parser: argparse.ArgumentParser) -> None:
        module = importlib.import_module(module_name)
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)

    return declare


def _run_bench(args: argparse.Namespace) -> int:
    import json

    result = importlib.import_module(args.bench_module).run_benchmark(args)
    _write_out(args, result)
    print(json.dumps(result, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------------------------
# shards: image folder / image list -> webdataset tar shards + manifest.json
# --------------------------------------------------------------------------------------------


def _add_shards(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "shards",
        formatter_class=_HelpFormatter,
        help="write webdataset tar shards + manifest.json from images",
        description="Write an image folder (flat = unlabeled, or one sub-folder per class) or a text list of\n"
        "images (one path per line, optionally '<TAB>class') as tar shards with a manifest.\n\n"
        "examples:\n  ssl-hybrid shards --src photos/ --out shards/photos --max-side 512\n"
        "  ssl-hybrid shards --src pets/ --out data/pets37 --label-regex '^(.*)_\\d+\\.\\w+$'",
    )
    parser.add_argument("--src", default=None, help="image folder or text file listing images (required)")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (required); a previous shard set there is replaced once the new one is complete",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument(
        "--max-side",
        type=int,
        default=0,
        help="shrink images larger than this and re-encode as JPEG; 0 keeps the original bytes",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality when --max-side re-encodes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the sorted source order")
    parser.add_argument("--workers", type=int, default=1, help="processes that read, check and re-encode images")
    parser.add_argument("--prefix", default=None, help="shard name prefix; default: the output folder's name")
    parser.add_argument(
        "--labels",
        choices=("auto", "folders", "none"),
        default="auto",
        help="class labels from sub-folders: auto = when every image is inside one",
    )
    parser.add_argument(
        "--label-regex",
        default=None,
        help="take the class from the file name instead (first regex group), e.g. '^(.*)_\\d+\\.jpg$'",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=0,
        help="store each image as a [C, H, W] array of this many channels in its own bit depth (16-bit TIFF, "
        "OME-TIFF, multi-page stacks, 16-bit PNG) with per-channel statistics, for data.channels; "
        "0 keeps the image files as they are (RGB photos)",
    )
    parser.add_argument("--channel-names", default="", help="comma-separated channel names, e.g. DAPI,GFP,RFP")
    parser.set_defaults(handler=_run_shards)


def _run_shards(args: argparse.Namespace) -> int:
    from ssl_hybrid.data.shards import write_shards

    for flag in ("src", "out"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required (see ssl-hybrid shards --help)")
    manifest = write_shards(
        args.src,
        args.out,
        shard_size=args.shard_size,
        max_side=args.max_side,
        quality=args.quality,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        workers=args.workers,
        prefix=args.prefix,
        labels=args.labels,
        label_regex=args.label_regex,
        progress=sys.stderr.isatty(),
        channels=args.channels,
        channel_names=[name.strip() for name in args.channel_names.split(",") if name.strip()],
    )
    classes = manifest["classes"]
    print(
        f"{args.out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
        f"{len(classes) if classes else 'no'} classes, {len(manifest['skipped'])} skipped"
    )
    return 0


def _add_make_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "make-demo",
        formatter_class=_HelpFormatter,
        help="generate a demonstration data set (microscopy: 16-bit, 5 channels)",
        description="Generate a small 16-bit, 5-channel OME-TIFF cell image set whose 3 classes differ only in a\n"
        "dim marker channel (below 1/256 of the range: 8-bit RGB conversion erases it), plus the 8-bit RGB\n"
        "composites an RGB pipeline would get (docs/multichannel.md).\n\n"
        "example:\n  ssl-hybrid make-demo microscopy --out demo/cells",
    )
    parser.add_argument("kind", choices=("microscopy",), help="which demonstration set")
    parser.add_argument("--out", required=True, help="output folder (train/, test/, rgb/ are written into it)")
    parser.add_argument("--per-class", type=int, default=60, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=30, help="test images per class")
    parser.add_argument("--size", type=int, default=0, help="image side in pixels (0 = 64)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.set_defaults(handler=_run_make_demo)


def _run_make_demo(args: argparse.Namespace) -> int:
    from ssl_hybrid.data.demo import SIDE, make_microscopy

    size = args.size or SIDE
    if args.per_class < 1 or args.test_per_class < 1 or size < 32:
        raise UserError("--per-class and --test-per-class must be >= 1 and --size >= 32")
    counts = make_microscopy(args.out, args.per_class, args.test_per_class, size, args.seed)
    print(f"{args.out}: {counts['train']} training and {counts['test']} test images (16-bit, 5 channels) + rgb/")
    return 0


# --------------------------------------------------------------------------------------------
# knn / linear / fewshot / finetune / report: few-label evaluation (handlers in ssl_hybrid/eval/commands.py)
# --------------------------------------------------------------------------------------------

_BACKBONE_HELP = (
    "model folder (model.safetensors + config.json), run directory (its newest weights by step), "
    "timm:<name> or random:<name> (timm: is also a random init: pretrained=False, no network)"
)


def _eval_data_args(parser: argparse.ArgumentParser, backbone: bool = True, cache: bool = True) -> None:
    """The labeled sets and the extraction settings, defaults from the config's ``eval`` group."""
    from ssl_hybrid.config import POOLINGS, EvalConfig

    if backbone:
        parser.add_argument("backbone", metavar="BACKBONE", help=_BACKBONE_HELP)
    parser.add_argument(
        "--train",
        default=None,
        help="labeled training set: image folder with class sub-folders, "
        "or labeled shards (directory with manifest.json, pattern)",
    )
    parser.add_argument("--test", default=None, help="labeled test set, same forms as --train")
    parser.add_argument(
        "--image-size",
        type=int,
        default=EvalConfig.image_size,
        help="evaluation size (resize + center crop); 0 = the size the backbone was trained at, 224 for timm:/random:",
    )
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="images per batch")
    parser.add_argument("--workers", type=int, default=EvalConfig.num_workers, help="data loader worker processes")
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=EvalConfig.pooling,
        help="multiscale: every conv stage's average + class token + patch mean, each L2-normalized "
        "(backbones with a pyramid: ours, timm CNNs); default: the model's own pooled feature",
    )
    if cache:
        parser.add_argument(
            "--cache-dir",
            default=None,
            help="feature cache directory; default $SSL_HYBRID_CACHE/features or ~/.cache/ssl_hybrid/features",
        )
        parser.add_argument("--no-cache", action="store_true", help="always re-extract features, write no cache")


def _eval_handler(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module("ssl_hybrid.eval.commands"), name)(args)

    return handler


def _add_knn(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "knn",
        formatter_class=_HelpFormatter,
        help="weighted k-NN accuracy of frozen features (DINO protocol, FAISS)",
        description="L2-normalized features, exact FAISS inner-product search, votes weighted by exp(sim/T).\n\n"
        "example:\n  ssl-hybrid knn runs/quickstart --train flowers/train --test flowers/test --out knn.json",
    )
    from ssl_hybrid.config import KNN_REPORTED_KS, EvalConfig

    _eval_data_args(parser)
    parser.add_argument("--k", type=int, default=EvalConfig.knn_k, help="headline k (top1/top5 in the JSON)")
    parser.add_argument("--ks", default=",".join(map(str, KNN_REPORTED_KS)), help="every k reported under per_k")
    parser.add_argument("--temperature", type=float, default=EvalConfig.knn_temperature, help="vote temperature T")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads; 0 = OMP_NUM_THREADS or all cores")
    _add_out_arg(parser, "the result")
    parser.set_defaults(handler=_eval_handler("run_knn"))


def _add_linear(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "linear",
        formatter_class=_HelpFormatter,
        help="linear probe (logistic regression) on frozen features",
        description="Chooses the L2 strength C on a held-out part of --train, refits on all of it, scores --test.",
    )
    from ssl_hybrid.config import EvalConfig

    _eval_data_args(parser)
    parser.add_argument(
        "--holdout",
        type=float,
        default=EvalConfig.linear_holdout,
        help="share of each training class held out to choose C",
    )
    parser.add_argument("--cs", default=None, help="comma-separated C values to try; default 1e-3..1e3 (7 values)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    _add_out_arg(parser, "the result")
    parser.set_defaults(handler=_eval_handler("run_linear"))


def _add_fewshot(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "fewshot",
        formatter_class=_HelpFormatter,
        help="k-shot accuracy over seeded k-per-class subsets",
        description="Seeded k-per-class subsets of --train (sample ids saved), evaluated on all of --test\n"
        "(--fewshot-protocol rest: subsets of both, each evaluated on the images it left out).\n\n"
        "example:\n  ssl-hybrid fewshot random:hybrid_tiny --train T --test V --shots 1,2,5,10 "
        "--seeds 5 --method knn,linear --out fewshot.json",
    )
    _eval_data_args(parser)
    _add_kshot_args(parser)
    parser.add_argument(
        "--splits-dir", default=None, help="where subset ids go; default <out>_splits/ or ./fewshot_splits"
    )
    _add_fewshot_protocol_arg(parser)
    _add_out_arg(parser, "the result")
    parser.set_defaults(handler=_eval_handler("run_fewshot"))


def _add_kshot_args(parser: argparse.ArgumentParser) -> None:
    from ssl_hybrid.config import EvalConfig

    defaults = EvalConfig()
    parser.add_argument("--shots", default=",".join(map(str, defaults.shots)), help="labels per class, comma-separated")
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="seeded subsets per shot count")
    parser.add_argument("--method", default=",".join(defaults.methods), help="knn and/or linear")


def _add_fewshot_protocol_arg(parser: argparse.ArgumentParser) -> None:
    from ssl_hybrid.config import FEWSHOT_PROTOCOLS, EvalConfig

    parser.add_argument(
        "--fewshot-protocol",
        choices=FEWSHOT_PROTOCOLS,
        default=EvalConfig.fewshot_protocol,
        help="heldout: shots drawn from --train, every draw scored on all of --test; rest: shots "
        "drawn from --train and --test together, each draw scored on every image it did not "
        "draw (a different test set per draw: less noise on small sets)",
    )


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "finetune",
        formatter_class=_HelpFormatter,
        help="fine-tune backbone + head on few labels, report test accuracy",
        description="Full fine-tuning with layer-wise lr decay, augmentation and early stopping on a validation\n"
        "split of --train. Runs under 'accelerate launch' for several GPUs. The best model (by the\n"
        "validation split) is saved as a model folder with its class names and preprocessing (--save).\n\n"
        "example:\n  ssl-hybrid finetune runs/quickstart --train pets/train --test pets/test --save pets_model/",
        declare=_finetune_arguments,
    )
    parser.set_defaults(handler=_eval_handler("run_finetune"))


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from ssl_hybrid.eval.finetune import FinetuneSettings  # imports torch: declared when finetune is used

    tuned = FinetuneSettings()  # the defaults live there, each with its reason
    _eval_data_args(parser, cache=False)
    parser.set_defaults(batch_size=tuned.batch_size)  # training batches: few-label sets hold a few hundred images
    parser.add_argument(
        "--shots", type=int, default=0, help="fine-tune on a seeded k-per-class subset; 0 = all of --train"
    )
    parser.add_argument("--epochs", type=int, default=tuned.epochs, help="maximum epochs")
    parser.add_argument(
        "--patience", type=int, default=tuned.patience, help="early stopping: epochs without a better val accuracy"
    )
    parser.add_argument("--lr", type=float, default=tuned.lr, help="AdamW peak lr of the head")
    parser.add_argument("--layer-decay", type=float, default=tuned.layer_decay, help="layer-wise lr decay (1 = off)")
    parser.add_argument("--weight-decay", type=float, default=tuned.weight_decay, help="AdamW weight decay")
    parser.add_argument(
        "--val-fraction", type=float, default=tuned.val_fraction, help="share of each class held out for early stopping"
    )
    parser.add_argument("--seed", type=int, default=tuned.seed, help="seed of subsets, splits, init and order")
    parser.add_argument(
        "--mixed-precision", choices=("no", "bf16", "fp16"), default=tuned.mixed_precision, help="Accelerate AMP"
    )
    parser.add_argument(
        "--save",
        metavar="DIR",
        default=None,
        help="model folder for the best model (by the validation split), with class names and "
        "preprocessing; default: <out stem>_model beside --out, <run>/finetuned for a run, "
        "else ./finetuned (numbered -2, -3 ... rather than replacing one)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --save folder")
    parser.add_argument("--no-save", action="store_true", help="keep only the scores, not the model")
    _add_out_arg(parser, "the result")


def _add_report(sub: argparse._SubParsersAction) -> None:
    from ssl_hybrid.config import KNN_PROTOCOLS, EvalConfig

    parser = sub.add_parser(
        "report",
        formatter_class=_HelpFormatter,
        help="compare backbones: markdown table, JSON, plots",
        description="k-NN and k-shot numbers of each backbone, a label-efficiency plot and retrieval grids.\n"
        "Without --image-size a random:/timm: baseline is evaluated at the size of the pretrained\n"
        "backbone(s) it is compared with.\n\n"
        "example:\n  ssl-hybrid report runs/quickstart random:hybrid_tiny --train T --test V --out-dir reports/",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help=_BACKBONE_HELP)
    _eval_data_args(parser, backbone=False)
    parser.add_argument("--names", default=None, help="comma-separated display names, one per RUN")
    _add_kshot_args(parser)
    parser.add_argument(
        "--out-dir", default="report", help="report.md, report.json, label_efficiency.png, retrieval_*.png"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="NAME",
        help="the backbone (by name) the verdict compares the others with; default: the random: or "
        "timm: one when the others are pretrained",
    )
    parser.add_argument(
        "--knn-protocol",
        choices=KNN_PROTOCOLS,
        default=EvalConfig.knn_protocol,
        help="heldout: --test images against the --train bank; leave_one_out: every image of both "
        "classified by all the others (all labels become queries: less noise on small sets)",
    )
    _add_fewshot_protocol_arg(parser)
    _add_out_arg(parser, "the report")
    parser.set_defaults(handler=_eval_handler("run_report"))


# --------------------------------------------------------------------------------------------
# embed / neighbors / predict: use a trained backbone (logic in ssl_hybrid/eval/embed.py and predict.py)
# --------------------------------------------------------------------------------------------


def _model_input_args(parser: argparse.ArgumentParser, size_and_pooling: bool = True) -> None:
    """Batch, workers (and image size, pooling): the evaluators' extraction settings and defaults."""
    from ssl_hybrid.config import POOLINGS, EvalConfig

    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="images per batch")
    parser.add_argument("--workers", type=int, default=EvalConfig.num_workers, help="data loader worker processes")
    if size_and_pooling:
        parser.add_argument(
            "--image-size",
            type=int,
            default=EvalConfig.image_size,
            help="resize + center crop size; 0 = the backbone's pretraining size (224 for timm:/random:)",
        )
        parser.add_argument(
            "--pooling",
            choices=POOLINGS,
            default=EvalConfig.pooling,
            help="the evaluators' pooling: multiscale where the backbone has a pyramid, else default",
        )


def _add_embed(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "embed",
        formatter_class=_HelpFormatter,
        help="write the embeddings of images (+ ids, FAISS index, meta) for retrieval, de-duplication, viewers",
        description="Embed every image of DATA (image folder, flat or with class sub-folders; shards; a text list of\n"
        "images) with the evaluators' preprocessing and pooling. Writes to --out: embeddings.npy (float32,\n"
        "L2-normalised, N x D, np.load(..., mmap_mode='r')), ids.csv (id, label, class, path in the same\n"
        "order), index.faiss (IndexFlatIP) and meta.json (backbone + hash, pooling, preprocessing).\n"
        "Chunks are saved as they finish: re-running an interrupted command resumes it. A folder holding\n"
        "another backbone's embeddings is refused. Unreadable images are skipped and counted.\n\n"
        "examples:\n  ssl-hybrid embed runs/quickstart photos/ --out emb/photos --plot\n"
        "  ssl-hybrid neighbors emb/photos photos/cat.jpg -k 8 --grid cat_neighbours.png",
    )
    parser.add_argument("backbone", metavar="BACKBONE", help=_BACKBONE_HELP)
    parser.add_argument(
        "data", metavar="DATA", help="image folder, shard directory / pattern, or a .txt list of images"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the embeddings folder")
    _model_input_args(parser)
    parser.add_argument(
        "--chunk-size", type=int, default=0, help="images per saved chunk (rounded up to whole batches); 0 = 32 batches"
    )
    parser.add_argument(
        "--plot",
        nargs="?",
        const="map.png",
        default=None,
        metavar="FILE.png",
        help="also draw a 2-D map of the embeddings (UMAP when installed, else PCA), coloured by "
        "label; a relative FILE goes into --out",
    )
    parser.set_defaults(handler=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssl_hybrid.eval.embed import embed_folder, load_embedder, open_embeddings, plot_map

    embedder = load_embedder(
        args.backbone,
        args.image_size or None,
        args.pooling,
        args.batch_size,
        args.workers,
        progress=sys.stderr.isatty(),
    )
    meta = embed_folder(embedder, args.data, args.out, args.chunk_size)
    print(
        f"{args.out}: {meta['count']} x {meta['dim']} embeddings ({meta['pooling']} pooling, {meta['image_size']} px), "
        f"{len(meta['skipped_unreadable'])} unreadable image(s) skipped"
    )
    if args.plot:
        plot = Path(args.plot) if Path(args.plot).is_absolute() else Path(args.out) / args.plot
        drawn = plot_map(open_embeddings(args.out), plot)
        print(f"map:  {drawn['path']} ({drawn['method']}, {drawn['points']} points)")
    return 0


def _add_neighbors(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "neighbors",
        formatter_class=_HelpFormatter,
        help="nearest images of a query in an embeddings folder; near-duplicates",
        description="The k most similar images (cosine similarity, exact FAISS search) of each QUERY: an image file\n"
        "or folder (embedded with the folder's backbone, checked by its hash) or an id from ids.csv\n"
        "(which is then not its own neighbour). --duplicates lists pairs above a similarity instead.\n\n"
        "examples:\n  ssl-hybrid neighbors emb/photos photos/cat.jpg -k 8 --grid cat.png --out cat.csv\n"
        "  ssl-hybrid neighbors emb/photos --duplicates 0.95 --out dups.csv",
    )
    parser.add_argument("folder", metavar="DIR", help="an embeddings folder written by `ssl-hybrid embed`")
    parser.add_argument("queries", nargs="*", metavar="QUERY", help="image paths, image folders or ids of DIR")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query")
    parser.add_argument(
        "--duplicates",
        type=float,
        default=None,
        metavar="SIMILARITY",
        help="list the pairs of images whose cosine similarity is at least this, e.g. 0.95",
    )
    parser.add_argument("--grid", default=None, metavar="FILE.png", help="also draw the queries and their neighbours")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the result: .csv as rows, else JSON")
    _model_input_args(parser, size_and_pooling=False)  # size and pooling: the folder's own
    parser.set_defaults(handler=_run_neighbors)


def _run_neighbors(args: argparse.Namespace) -> int:
    from ssl_hybrid.eval import embed as emb
    from ssl_hybrid.eval.predict import write_result

    embeddings = emb.open_embeddings(args.folder)
    if args.duplicates is not None:
        pairs = emb.duplicates(embeddings, args.duplicates)
        print(f"{len(pairs)} pair(s) with similarity >= {args.duplicates:g}")
        for pair in pairs:
            print(f"{pair['similarity']:.4f}  {pair['a']}  {pair['b']}")
        if args.out:
            write_result(
                args.out,
                {"threshold": args.duplicates, "pairs": pairs},
                pairs,
                ("similarity", "a", "b", "row_a", "row_b"),
            )
        return 0
    if not args.queries:
        raise UserError("name at least one QUERY (an image, a folder or an id), or use --duplicates")
    results = emb.nearest(embeddings, args.queries, args.k, batch_size=args.batch_size, num_workers=args.workers)
    for result in results:
        print(f"query {result['query']}")
        for item in result["neighbours"]:
            print(
                f"  {item['rank']:3d}  {item['similarity']:.4f}  {item['id']}"
                + (f"  ({item['class']})" if item["class"] else "")
            )
    if args.out:
        rows = [dict(item, query=r["query"]) for r in results for item in r["neighbours"]]
        write_result(
            args.out,
            {"folder": args.folder, "k": args.k, "results": results},
            rows,
            ("query", "rank", "similarity", "id", "label", "class", "path"),
        )
    if args.grid:
        print(f"grid: {emb.neighbour_grid(embeddings, results, args.grid)}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from ssl_hybrid.config import EvalConfig

    parser = sub.add_parser(
        "predict",
        formatter_class=_HelpFormatter,
        help="classify images with a fine-tuned model, or by k-NN on a labeled bank",
        description="MODEL is a classifier folder saved by `ssl-hybrid finetune`: the top classes with their softmax\n"
        "probabilities. Or MODEL is any backbone and --bank a labeled folder/shards (a few images per\n"
        "class): k-NN with the evaluators' protocol (k=20, T=0.07, votes weighted by exp(sim/T)), the\n"
        "probability being a class's share of the votes. Unreadable images are skipped and counted.\n\n"
        "examples:\n  ssl-hybrid predict runs/finetuned photos/a.jpg photos/b.jpg --out predictions.csv\n"
        "  ssl-hybrid predict runs/quickstart photos/ --bank labeled_examples/ --top 3",
    )
    parser.add_argument("model", metavar="MODEL", help="classifier folder, or (with --bank) " + _BACKBONE_HELP)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders, image lists or shards")
    parser.add_argument(
        "--bank",
        default=None,
        help="labeled image folder (class sub-folders) or labeled shards: "
        "classify by k-NN instead of a classifier head",
    )
    parser.add_argument("--top", type=int, default=5, help="classes listed per image")
    parser.add_argument("-k", type=int, default=EvalConfig.knn_k, help="neighbours that vote (with --bank)")
    parser.add_argument(
        "--temperature", type=float, default=EvalConfig.knn_temperature, help="vote temperature (with --bank)"
    )
    parser.add_argument(
        "--out", default=None, metavar="FILE", help="also write the predictions: .csv as rows, else JSON"
    )
    _model_input_args(parser)
    parser.add_argument("--no-cache", action="store_true", help="with --bank: do not read or write the feature cache")
    parser.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from ssl_hybrid.eval import predict as pr

    if args.bank:
        from ssl_hybrid.eval.features import default_cache_dir

        result = pr.predict_with_bank(
            args.model,
            args.bank,
            args.images,
            k=args.k,
            temperature=args.temperature,
            top=args.top,
            image_size=args.image_size or None,
            pooling=args.pooling,
            batch_size=args.batch_size,
            num_workers=args.workers,
            cache_dir=None if args.no_cache else default_cache_dir(),
            progress=sys.stderr.isatty(),
        )
    else:
        result = pr.predict_with_model(
            args.model,
            args.images,
            top=args.top,
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=sys.stderr.isatty(),
        )
    print(pr.prediction_table(result), end="")
    if args.out:
        pr.write_result(
            args.out, result, pr.prediction_rows(result), ("image", "rank", "class", "label", "probability")
        )
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "pretrain",
        formatter_class=_HelpFormatter,
        help="self-supervised pretraining (resumes automatically)",
        description="Pretrain a backbone with the recipe's objectives (MIM, DINO, SimCLR or joint).\n\n"
        "Re-running the same command resumes from the newest complete checkpoint in\n"
        "<train.output_dir>/<name>/checkpoints/; SIGTERM/SIGINT save a checkpoint and exit.\n\n"
        "examples:\n  ssl-hybrid pretrain -c recipes/quickstart.yaml\n"
        "  accelerate launch --config_file launch/1gpu.yaml -m ssl_hybrid pretrain -c recipes/hybrid_small_joint.yaml",
    )
    _add_recipe_args(parser)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the run folder and start over (only a run folder, and only once the new config, "
        "model and data are built)",
    )
    _add_out_arg(parser, "the run summary")
    parser.set_defaults(handler=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    import json

    from ssl_hybrid.config import load_config
    from ssl_hybrid.train.engine import pretrain

    summary = pretrain(load_config(args.config, args.overrides), fresh=args.fresh)
    _write_out(args, summary)
    print(json.dumps(summary, indent=2))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        formatter_class=_HelpFormatter,
        help="checkpoint -> model folder (timm / Hugging Face format)",
        description="Export the student backbone of a checkpoint (a step_* directory, or a run directory's\n"
        "newest complete checkpoint) as a model folder: model.safetensors + config.json + README.md,\n"
        "loaded by timm.create_model('local-dir:<folder>', pretrained=True) after\n"
        "`import ssl_hybrid.models`, by every ssl-hybrid evaluator, and uploaded as is by\n"
        "huggingface_hub.upload_folder. An existing folder is replaced only with --force.\n\n"
        "examples:\n  ssl-hybrid export runs/quickstart                 # -> runs/quickstart/model/\n"
        "  ssl-hybrid export runs/quickstart/checkpoints/step_00000100  # -> runs/quickstart/exports/step_00000100/\n"
        "  ssl-hybrid export runs/quickstart --out-dir exported/ --force",
    )
    parser.add_argument("checkpoint", metavar="RUN_OR_STEP_DIR", help="run directory or checkpoints/step_* directory")
    parser.add_argument(
        "--out-dir",
        default=None,
        help="the model folder to write (default: <run>/model for a run, <run>/exports/step_<N> for a step)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing folder (once the new one is complete)"
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx into the folder (dynamic batch and image size; needs the onnx extra)",
    )
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssl_hybrid.train.export import export_checkpoint

    folder = export_checkpoint(Path(args.checkpoint), Path(args.out_dir) if args.out_dir else None, force=args.force)
    print(folder)
    if args.onnx:
        from ssl_hybrid.models.onnx import export_saved_onnx

        print(export_saved_onnx(folder))
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "search",
        formatter_class=_HelpFormatter,
        help="architecture search across the conv/transformer split under a measured budget (resumable)",
        description="Sample hybrid architectures - conv stage type (space.conv_type: resnet = batch-normed basic\n"
        "blocks as in resvit_*, convnext = the hybrid_* stages), conv widths/depths, transformer depth/width,\n"
        "heads, attention mode, token keep rate - refusing combinations a conv type cannot build (with the\n"
        "reason); reject those over the measured budget (params, GFLOPs, latency on this device); optionally\n"
        "prune with a zero-cost proxy; then successive halving: short pretraining + k-NN on a small labeled\n"
        "set, more budget for the best. schedule.min_seconds budgets pretraining CPU time (each candidate's\n"
        "steps from its measured CPU seconds per step) instead of steps; references=[resvit_tiny,hybrid_tiny] scores\n"
        "named presets alongside at the same budget. Writes pareto.md/json/png and chosen.yaml (a recipe for\n"
        "`ssl-hybrid pretrain -c`) to <output_dir>/<name>/. Re-running the same command resumes; scored\n"
        "candidates are never re-run.\n\n"
        "examples:\n  OMP_NUM_THREADS=1 ssl-hybrid search -c recipes/search_split_flowers12.yaml\n"
        "  ssl-hybrid search -c recipes/search_flowers12.yaml num_candidates=6 budget.max_latency_ms=20",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="SEARCH_YAML",
        default=None,
        help="search YAML (space, budget, schedule, proxy); none = defaults",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="search overrides, e.g. num_candidates=8 schedule.min_steps=20 proxy.knn_shots=10",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write pareto.md/json/png and chosen.yaml from what is scored so far (a search running or "
        "interrupted) and exit; runs nothing",
    )
    parser.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from ssl_hybrid.search.run import load_search_config, report_search, run_search

    config = load_search_config(args.config, args.overrides)
    summary = report_search(config) if args.report_only else run_search(config)
    print((config.out_dir() / "pareto.md").read_text(encoding="utf-8"), end="")
    print(f"chosen: {summary['chosen']} -> {summary.get('recipe')}  ({summary['seconds']:.0f} s)")
    return 0


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    from ssl_hybrid.config import TrainConfig
    from ssl_hybrid.quickstart import DEFAULT_MINUTES, recipe_summary

    recipe = recipe_summary()
    parser = sub.add_parser(
        "quickstart",
        formatter_class=_HelpFormatter,
        help="pretrain on the embedded corpus, compare with random init, write a report with a verdict",
        description=f"The whole pipeline on the embedded corpus (data/pets37), no download, CPU or GPU:\n"
        f"pretrain {recipe} from recipes/quickstart.yaml;\n"
        "training stops at train.steps or after --minutes, whichever comes first (too few steps for\n"
        "the effect: the last line says how many minutes would fit them). Then k-NN (every labeled\n"
        "image against all the others) and 1/5-shot linear probes (shots drawn from all images, each\n"
        "draw scored on the rest) of the pretrained and a randomly initialized backbone, and a verdict\n"
        "computed from the numbers (beyond noise or not, above chance or not).\n"
        "Writes <output-dir>/quickstart/: report.md, report.json,\n"
        "label_efficiency.png, retrieval_*.png, plus the usual run files. Re-running resumes;\n"
        "--fresh starts over.",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help="wall-clock limit of the pretraining; it stops at train.steps or this, whichever comes "
        "first (evaluation adds about a minute)",
    )
    parser.add_argument(
        "--output-dir", default=TrainConfig.output_dir, help="where the run directory 'quickstart' goes"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the earlier quickstart run and start over (once the new one is built)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides on top of recipes/quickstart.yaml, e.g. train.steps=300",
    )
    _add_out_arg(parser, "the report")
    parser.set_defaults(handler=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> int:
    from ssl_hybrid.eval.features import is_main_process
    from ssl_hybrid.quickstart import quickstart

    report = quickstart(args.minutes, args.output_dir, args.fresh, args.overrides)
    if not is_main_process():  # torchrun / accelerate launch: rank 0 writes and prints the report
        return 0
    _write_out(args, report)
    print(report["table"], end="")
    print(f"\nreport: {report['markdown']}\nplot:   {report['plot']}")
    for entry in report["entries"]:
        print(f"grid:   {entry['retrieval_grid']['path']}")
    if report["pretraining"].get("backbone"):  # where the tour goes next: predict, embed, neighbors
        print(
            f"model:  {report['pretraining']['backbone']} (to classify photos and find similar images: "
            "README, 'Then use it')"
        )
    print(f"\nverdict: {report['verdict']['line']}")
    if report.get("budget_note"):  # last, so a short run's verdict is never read without it
        print(f"note: {report['budget_note']}")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_config,
    _add_bench,
    _add_shards,
    _add_make_demo,
    _add_knn,
    _add_linear,
    _add_fewshot,
    _add_finetune,
    _add_report,
    _add_embed,
    _add_neighbors,
    _add_predict,
    _add_pretrain,
    _add_export,
    _add_search,
    _add_quickstart,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _CommandParser(
        prog="ssl-hybrid",
        formatter_class=_HelpFormatter,
        description="Self-supervised pretraining of hybrid CNN->Transformer backbones on sharded image "
        "streams,\nand few-label evaluation of what they learned.\n\n"
        "Runs land in <train.output_dir>/<name>/ (default runs/<name>/): config.yaml, "
        "metrics.jsonl,\ncheckpoints/step_<8-digit step>/ and, at the end, the model folder model/ "
        "(model.safetensors +\nconfig.json + README.md: timm and the Hugging Face Hub read it).",
        epilog="Run 'ssl-hybrid <command> --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ssl-hybrid {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader gone while output sat in the buffer (``| head -1``) shows up here
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():  # a pipe of a worker or a subprocess: a real error
            raise
        return _stdout_closed()


def _stdout_reader_gone() -> bool:
    """Is stdout a pipe whose reader has closed it? (poll reports POLLERR on the write end of such a pipe.)"""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or a stdout without a descriptor
        return False


def _stdout_closed() -> int:
    """The reader of stdout went away (``ssl-hybrid neighbors ... | head -1``): exit quietly, as the Python docs'
    note on SIGPIPE (``signal`` module) says: stdout to devnull, so the interpreter's final flush cannot raise
    again, and exit status 1."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (captured): nothing left to flush
        pass
    return 1


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    setup_logging(args.verbose - args.quiet)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"ssl-hybrid {args.command}: error: {redact(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"ssl-hybrid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
