"""Typed configuration: every default lives here, with a one-line reason (each field is an
:func:`option` whose ``metadata["help"]`` ``ssl-hybrid config --explain`` prints).

A run's configuration is built in three layers, each overriding the one before:

1. the dataclass defaults below,
2. a YAML recipe (``recipes/*.yaml``), which only names what it changes,
3. ``key=value`` overrides from the command line (``train.steps=200 optim.lr=1e-3``).

OmegaConf structured configs reject unknown keys (typos included, at any depth) and values of the
wrong type on merge, so the schema below *is* the validation of names and types. Value checks that
a type cannot express (negative lr, mask ratio outside [0, 1), ...) live in :func:`validate`.
Every problem becomes a :class:`ConfigError` whose message names the file and the key; the CLI
prints it on one line and exits with status 2 before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_hybrid.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = "data/pets37"  # the embedded default corpus (shards + manifest.json), see data/README.md


def option(default: Any, reason: str) -> Any:
    """A config field with its one-line reason (``metadata["help"]``, what ``ssl-hybrid config --explain``
    prints). A mutable default ({}, []) becomes a factory, so instances never share it."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": reason})
    return field(default=default, metadata={"help": reason})


@dataclass
class DataConfig:
    train: str = option(
        DEFAULT_CORPUS,
        'Shards: a directory holding manifest.json, a pattern ("s-{000000..000009}.tar"), '
        "a .txt list or URLs or an image folder (sharded once into $SSL_HYBRID_CACHE; "
        "run `ssl-hybrid shards` to control how).",
    )
    val: str = option(
        "", 'Labeled set (image folder with class sub-folders or labeled shards) for the online k-NN monitor; "" = off.'
    )
    num_workers: int = option(
        2, "2 workers keep decoding + augmentation off the training process on a small machine; raise on GPUs."
    )
    worker_nice: int = option(
        -1,
        "Niceness (0..19) of the data workers; -1 = auto: 19 when training on CPU, where "
        "the workers share the cores with the compute threads and the step waits for any "
        "thread they preempt (1.09-1.24x the steps/s on a 2-core VM), 0 with a GPU.",
    )
    image_size: int = option(224, "224 px is the size every reference number (DINO, MAE, timm) is quoted at.")
    local_image_size: int = option(
        96, "Local crops for multi-crop DINO and SimCLR; 96 px is DINO's default (a third to a half of image_size)."
    )
    num_local_views: int = option(
        0,
        "Multi-crop (DINO, SimCLR): local crops next to the 2 global ones, used by every "
        "objective with views (DINO, SimCLR); 0 halves a DINO step's cost on small "
        "machines.",
    )
    views: str = option(
        "dino",
        "Which lightly transform makes the views: dino, simclr (both multi-crop with "
        "data.num_local_views > 0), or mae (one light crop).",
    )
    simclr_min_scale: float = option(
        0.08,
        "SimCLR views: smallest crop share of the global views, and the largest of "
        "the local crops (SimCLR's 0.08 at ImageNet scale; small images and corpora "
        "want more context per view).",
    )
    simclr_local_min_scale: float = option(
        0.05,
        "SimCLR local crops (data.num_local_views > 0): smallest crop "
        "share; they span this .. simclr_min_scale (SwAV's 0.05 .. 0.14).",
    )
    simclr_blur: float = option(
        0.5, "SimCLR views: Gaussian blur probability (lightly's 0.5; its CIFAR recipe turns blur off)."
    )
    simclr_color_jitter: float = option(
        1.0,
        "SimCLR views: colour-jitter strength (lightly's 1.0; lower keeps colour, a cue for flowers, pets and birds).",
    )
    simclr_hue: float = option(
        0.2,
        "SimCLR views: largest hue shift before data.simclr_color_jitter scales it "
        "(lightly's 0.2); 0 skips the hue step, the costliest part of the jitter.",
    )
    simclr_grayscale: float = option(
        0.2, "SimCLR views: probability of a grayscale view (lightly's 0.2); 0 keeps every view in colour."
    )
    augment_on: str = option(
        "workers",
        "Where the photometric augmentations run: workers (lightly's per-image transforms, as before) or device "
        "(batched tensor ops in the training process, on the GPU when there is one; workers only crop and flip).",
    )
    shuffle_buffer: int = option(
        1000, "Sample shuffle buffer over compressed bytes; 1000 mixes shards well at a few MB of memory."
    )
    resampled: bool = option(
        True, "Infinite resampled shards for training, so every rank gets the same number of batches."
    )
    max_skip_rate: float = option(
        0.1, "Stop the run when more than this share of samples is corrupt: a few bad files are normal, 10% is not."
    )
    skip_rate_min_samples: int = option(
        100, "The skip rate is only judged after this many samples (and at each worker-epoch end): 1 bad of 3 is noise."
    )
    channels: int = option(
        3,
        "Image channels: 3 = RGB photos (decoded and augmented as today); any other count (microscopy) needs "
        "shards written by `ssl-hybrid shards --channels N` (16-bit kept, per-channel statistics).",
    )
    channel_names: list[str] = option(
        [], "Names of the channels in order (e.g. [DAPI, GFP, ...]); [] = the shards' own, recorded in the model."
    )
    allow_pipe_in_lists: bool = option(
        False,
        "A 'pipe:' line in a shard list file runs a shell command; off, so a "
        "list from elsewhere runs nothing (pipe: typed in data.train always runs).",
    )


# Attention in the transformer stages (model.attn_mode); ssl_hybrid.models.attention imports this tuple, so it lives
# here, where no torch is imported (the CLI parses configs without torch).
ATTN_MODES = ("global", "window", "topk")


@dataclass
class ModelConfig:
    name: str = option(
        "resvit_tiny",
        "Any timm model name; resvit_* and hybrid_* are registered by ``import "
        "ssl_hybrid.models``. resvit_tiny (batch-normed conv stages + 4 ViT blocks) learns "
        "fastest of ours at small budgets (benchmarks/results/label_efficiency).",
    )
    drop_path_rate: float = option(
        0.1, "Stochastic depth; 0.1 is the ViT-S/DINO setting and harmless for small models."
    )
    attn_mode: str = option(
        "global",
        f"Attention in the transformer stages: {' | '.join(ATTN_MODES)} (sparse options trade accuracy for speed).",
    )
    token_keep_rate: float = option(
        1.0, "Token selection keep rate at the selection blocks; 1.0 = off (pretraining wants every token)."
    )
    grad_checkpointing: bool = option(
        False, "Activation checkpointing trades ~30% more compute for much less memory on large models."
    )
    arch: dict[str, Any] = option(
        {},
        "Architecture kwargs passed to the model factory over its defaults (e.g. "
        "{conv_dims: [32, 64], depth: 6}); written by `ssl-hybrid search` for its "
        "chosen candidate. {} = the named variant as registered.",
    )


@dataclass
class ObjectiveConfig:
    mim_weight: float = option(
        1.0,
        "Weight of the MIM (masked-pixel) loss; an objective with weight 0 is not built. "
        "Default: joint MIM + DINO (iBOT/CMAE-like).",
    )
    dino_weight: float = option(1.0, "Weight of the DINO loss; 0 = not built (see mim_weight).")
    simclr_weight: float = option(0.0, "Weight of the SimCLR loss; 0 = not built (see mim_weight).")
    mask_ratio: float = option(
        0.75, "MAE: 75% of the 16x16-stride grid hidden; the speed-up and the difficulty both come from it."
    )
    norm_pix_loss: bool = option(True, "MAE's normalized-pixel target gives better features than raw pixels.")
    decoder_depth: int = option(
        2, "MIM decoder depth: a light decoder (MAE uses 8 x 512; ConvMAE-small 4 x 256 is enough at our scale)."
    )
    decoder_dim: int = option(256, "MIM decoder width (see decoder_depth).")
    dino_out_dim: int = option(4096, "DINO head output; 65536 is DINO's ImageNet setting, 4096 suits small corpora.")
    student_temp: float = option(0.1, "DINO student temperature (DINO's 0.1).")
    teacher_temp: float = option(0.07, "DINO teacher temperature after the warm-up (DINO's 0.07).")
    warmup_teacher_temp: float = option(
        0.04, "DINO teacher temperature at step 0, raised linearly to teacher_temp (DINO's 0.04)."
    )
    warmup_teacher_temp_steps: int = option(
        1000, "Teacher temperature warm-up length in steps (DINO: 30 of 100 epochs)."
    )
    momentum_teacher: float = option(
        0.996, "EMA teacher momentum, cosine from this base to 1.0 (DINO's 0.996 for long runs; lower learns faster)."
    )
    simclr_temperature: float = option(0.1, "SimCLR NT-Xent temperature; 0.1 works at small and large batch sizes.")
    simclr_out_dim: int = option(128, "SimCLR projection output dimension (SimCLR paper: 128).")
    embedding: str = option(
        "default",
        "What the SimCLR head sees: default (the backbone's pooled feature) or "
        "multiscale (every conv stage pooled, + class token + patch mean: the conv "
        "stages get the loss's gradient directly). SimCLR only.",
    )


@dataclass
class OptimConfig:
    lr: float = option(
        5e-4,
        "Base learning rate per 256 images; the effective lr scales linearly with the global batch (Goyal et al.).",
    )
    min_lr: float = option(1e-6, "Cosine decay ends here rather than at 0 so late steps still learn (DINO: 1e-6).")
    weight_decay: float = option(
        0.04, "AdamW weight decay at step 0, cosine from weight_decay to weight_decay_end (DINO: 0.04 -> 0.4)."
    )
    weight_decay_end: float = option(0.4, "AdamW weight decay at the last step (DINO: 0.4).")
    warmup_fraction: float = option(
        0.1, "Linear warm-up as a share of the total steps; 10% keeps early large-lr steps from diverging."
    )
    beta1: float = option(0.9, "AdamW beta1 (the usual 0.9).")
    beta2: float = option(0.95, "AdamW beta2; 0.95 is MAE's choice for stable large-batch pretraining.")
    clip_grad: float = option(3.0, "Global grad-norm clip; 3.0 is DINO's value. 0 = off.")
    layer_decay: float = option(
        1.0,
        "Layer-wise lr decay (BEiT/MAE): backbone layer i of L (its group_matcher's "
        "layers) trains at lr * layer_decay ** (L - i), the heads at lr; 1.0 = off. "
        "`ssl-hybrid finetune` has its own --layer-decay.",
    )
    transformer_lr_scale: float = option(
        1.0,
        "lr multiplier for the backbone's transformer part (ViT blocks, class "
        "token, position table); 1.0 = one lr. At CPU budgets ViT blocks "
        "collapse at an lr the batch-normed conv stages learn fast with.",
    )


@dataclass
class TrainConfig:
    output_dir: str = option("runs", "Run directories are <output_dir>/<name>.")
    steps: int = option(1000, "Count in steps, not epochs (dinov2): a streaming corpus has no natural epoch.")
    batch_size: int = option(64, "Global batch size, split evenly across processes.")
    seed: int = option(0, "One seed for model init, data order and augmentations, so runs are reproducible.")
    checkpoint_every: int = option(500, "Save a resumable checkpoint this often (steps); 0 = only at the end.")
    keep_checkpoints: int = option(
        2, "Keep the newest K complete checkpoints; older ones are deleted after a new one is complete."
    )
    max_seconds: float = option(
        0.0, "Wall-clock budget in seconds: stop cleanly with a checkpoint and the export when it runs out; 0 = none."
    )
    mixed_precision: str = option("no", 'no | bf16 | fp16; bf16 is the safe default on GPUs that have it, "no" on CPU.')
    grad_accum_steps: int = option(
        1, "Accumulate gradients over this many micro-batches (refused for in-batch-negative losses like SimCLR)."
    )
    log_every: int = option(10, "Log metrics every N steps.")
    knn_every: int = option(0, "Online k-NN monitor on data.val every N steps; 0 = off.")
    max_nonfinite_steps: int = option(
        5,
        "Stop after this many non-finite steps in a row: a non-finite loss or "
        "gradient norm (fp16 overflow included) skips the step and counts it.",
    )


# Frozen-feature poolings (eval.pooling): see EvalConfig.pooling and ssl_hybrid.eval.features.
POOLINGS = ("multiscale", "default")
# Every k the k-NN evaluation reports under per_k (DINO reports 10/20/100/200); eval.knn_k is the headline.
KNN_REPORTED_KS = (10, 20, 100, 200)
# How a report's k-NN column is measured (ssl_hybrid.eval.report.evaluate_knn): test images against the
# training bank, or every labeled image against all the others (all labels become queries on a small set).
KNN_PROTOCOLS = ("heldout", "leave_one_out")
# Few-shot classifiers on frozen features, and where a k-shot draw's labels come from (ssl_hybrid.eval.fewshot).
FEWSHOT_METHODS = ("knn", "linear")
FEWSHOT_PROTOCOLS = ("heldout", "rest")


@dataclass
class EvalConfig:
    knn_k: int = option(20, "k-NN headline k (DINO's protocol: k=20; 10, 20, 100 and 200 are all reported).")
    knn_temperature: float = option(
        0.07, "k-NN vote temperature: each neighbour votes exp(sim / T) for its class (DINO's 0.07)."
    )
    batch_size: int = option(128, "Feature extraction batch size; inference only, so larger than training.")
    image_size: int = option(0, "Evaluation image size; 0 = the size the backbone was pretrained at.")
    pooling: str = option(
        "multiscale",
        "Frozen-feature pooling: multiscale (every conv stage + class token + patch "
        "mean, each L2-normalized) uses the local detail of the early stages that a "
        "single pooled vector drops; backbones without a pyramid (plain ViTs) fall "
        "back to default (the model's own pre-logits pooling).",
    )
    num_workers: int = option(
        2, "Loader processes that decode and resize images while the model extracts features from the last batch."
    )
    knn_protocol: str = option(
        "heldout",
        "How a report's k-NN column is measured: heldout (test images against the training bank) or "
        "leave_one_out (every labeled image against all the others: all labels become queries, less noise "
        "on small sets).",
    )
    shots: list[int] = option([1, 2, 5, 10], "Labels per class of the k-shot evaluations (few-label regime).")
    seeds: int = option(5, "Seeded k-shot draws per shot count: a mean over draws, with its spread reported.")
    methods: list[str] = option(["knn", "linear"], "Few-shot classifiers on frozen features: knn and/or linear.")
    fewshot_protocol: str = option(
        "heldout",
        "heldout: shots drawn from the training set, every draw scored on all of the test set; rest: drawn "
        "from both sets together, each draw scored on every image it did not draw (less noise on small sets).",
    )
    linear_holdout: float = option(
        0.2, "Share of each training class the linear probe holds out to choose its L2 strength C, then refits on."
    )


@dataclass
class Config:
    name: str = option("run", "Run name; the run directory is <train.output_dir>/<name>.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _error_key(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    return str(key) if key else "?"


def _error_text(err: OmegaConfBaseException) -> str:
    """OmegaConf messages span lines (with a 'full_key:' trailer); keep the first line."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _read_recipe(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: recipe file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read recipe ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of config groups, got {type(loaded).__name__}")
    return loaded


def known_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config, groups included ("train", "train.steps", ...)."""
    keys = []
    for name, value in cfg.items_ex(resolve=False):
        dotted = f"{prefix}{name!s}"
        keys.append(dotted)
        if isinstance(value, DictConfig):
            keys.extend(known_keys(value, f"{dotted}."))
    return keys


def unknown_key_message(key: str, known: list[str]) -> str:
    """ "unknown key 'train.stpes' — did you mean 'train.steps'?" (difflib's closest match, when close).
    Within an existing group only that group's keys compete, so the shared prefix cannot make a match."""
    group, _, last = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
    if group and group in known:
        match = [f"{group}.{m}" for m in difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)]
    else:
        match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key '{key}'" + (f" — did you mean '{match[0]}'?" if match else "")


# ${oc.env:NAME} would put the variable's value (often a secret) into the resolved config, which is saved
# (config.yaml, checkpoints) and logged: a recipe or override names what a run reads, not the secret.
_ENV_INTERPOLATION = re.compile(r"\$\{\s*oc\.env\s*:")


def _env_interpolations(values: Any, prefix: str = "") -> list[str]:
    """The dotted keys of ``values`` (dict, list or DictConfig, unresolved) whose string uses ``${oc.env:...}``."""
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=False)
    if isinstance(values, dict):
        return [key for name, value in values.items() for key in _env_interpolations(value, f"{prefix}{name}.")]
    if isinstance(values, (list, tuple)):
        return [key for i, value in enumerate(values) for key in _env_interpolations(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(values, str) and _ENV_INTERPOLATION.search(values) else []


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    env_keys = _env_interpolations(update)
    if env_keys:
        raise ConfigError(
            f"{source}: key '{env_keys[0]}': ${{oc.env:...}} is not resolved, since the resolved config "
            "is saved and logged; let a pipe: command's shell read the variable ($NAME) or use the "
            "storage tool's own credentials"
        )
    try:
        return cast(DictConfig, OmegaConf.merge(base, update))
    except OmegaConfBaseException as err:
        key = _error_key(err)
        if "not in struct" in str(err) or "Key '" in str(err) and "not" in str(err):
            raise ConfigError(f"{source}: {unknown_key_message(key, known_keys(base))}") from None
        raise ConfigError(f"{source}: key '{key}': {_error_text(err)}") from None


def _parse_overrides(overrides: list[str]) -> list[str]:
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command line: override '{item}' must look like key=value (e.g. train.steps=200)")
        # "key=" means the empty string (e.g. data.val= turns the k-NN monitor off), not YAML's null.
        parsed.append(f"{item}''" if item.endswith("=") else item)
    return parsed


def load_layered(schema: Any, recipe: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Strict layering for any dataclass schema: defaults <- recipe YAML <- key=value overrides.
    ``schema`` is a dataclass type or an already-built structured DictConfig. Returns the dataclass object."""
    cfg = schema if isinstance(schema, DictConfig) else OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if recipe:
        path = Path(recipe)
        cfg = _merge(cfg, _read_recipe(path), str(path))
    for item in _parse_overrides(overrides or []):
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"command line: cannot parse override '{item}': {_error_text(err)}") from None
        cfg = _merge(cfg, dotlist, f"command line ({item})")
    return OmegaConf.to_object(cfg)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- recipe YAML <- key=value overrides; validated. Raises ConfigError on any problem."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.model.arch, False)  # free-form factory kwargs; the model factory checks them
    config = load_layered(cfg, recipe, overrides)
    validate(config, source=str(recipe) if recipe else "defaults")
    return config


# ---------------------------------------------------------------------------------------------
# Value checks that types cannot express
# ---------------------------------------------------------------------------------------------

_CHOICES = {
    "data.views": ("dino", "simclr", "mae"),
    "data.augment_on": ("workers", "device"),
    "model.attn_mode": ATTN_MODES,
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "eval.pooling": POOLINGS,
    "eval.knn_protocol": KNN_PROTOCOLS,
    "eval.fewshot_protocol": FEWSHOT_PROTOCOLS,
    "objective.embedding": ("default", "multiscale"),
}


# model.arch may not shadow these: each has its own config key, and two sources for one value would disagree.
_OWN_MODEL_KEYS = {"img_size", "num_classes", "pretrained", "drop_path_rate", "attn_mode", "token_keep_rate"}
_OWN_MODEL_KEYS.add("in_chans")  # data.channels


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(config: Config, source: str = "config", num_processes: int = 1) -> None:
    """Raise ConfigError naming the first inconsistent value."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: key '{key}' = {_get(config, key)!r}: {why}")

    for key, choices in _CHOICES.items():
        need(_get(config, key) in choices, key, f"must be one of {', '.join(choices)}")
    need(
        is_folder_name(config.name),
        "name",
        "must be one folder name inside train.output_dir (not empty, '.' or '..', no '/' or '\\')",
    )
    need(bool(config.data.train), "data.train", "must name shards, a shard directory or an image folder")
    need(config.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(-1 <= config.data.worker_nice <= 19, "data.worker_nice", "must be -1 (auto) or a niceness 0..19")
    need(
        config.data.image_size > 0 and config.data.image_size % 16 == 0,
        "data.image_size",
        "must be a positive multiple of 16 (the patch grid stride)",
    )
    need(config.data.local_image_size > 0, "data.local_image_size", "must be > 0")
    need(config.data.num_local_views >= 0, "data.num_local_views", "must be >= 0")
    if config.data.num_local_views > 0:
        need(
            config.data.local_image_size % 16 == 0 and config.data.local_image_size <= config.data.image_size,
            "data.local_image_size",
            f"must be a multiple of 16 (the patch grid stride) and at most data.image_size "
            f"({config.data.image_size}) when data.num_local_views > 0",
        )
    need(0.0 < config.data.simclr_min_scale <= 1.0, "data.simclr_min_scale", "must be in (0, 1]")
    if config.data.views == "simclr" and config.data.num_local_views > 0:
        need(
            0.0 < config.data.simclr_local_min_scale < config.data.simclr_min_scale,
            "data.simclr_local_min_scale",
            "must be in (0, data.simclr_min_scale): local crops are the smaller ones",
        )
    need(0.0 <= config.data.simclr_blur <= 1.0, "data.simclr_blur", "must be in [0, 1]")
    need(0.0 <= config.data.simclr_color_jitter <= 1.0, "data.simclr_color_jitter", "must be in [0, 1]")
    need(0.0 <= config.data.simclr_hue <= 0.5, "data.simclr_hue", "must be in [0, 0.5] (a share of the hue circle)")
    need(0.0 <= config.data.simclr_grayscale <= 1.0, "data.simclr_grayscale", "must be in [0, 1]")
    need(config.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    need(1 <= config.data.channels <= 64, "data.channels", "must be in 1..64 (3 = RGB photos)")
    need(
        not config.data.channel_names or len(config.data.channel_names) == config.data.channels,
        "data.channel_names",
        f"must name each of the data.channels={config.data.channels} channels, or be []",
    )
    need(0.0 <= config.data.max_skip_rate <= 1.0, "data.max_skip_rate", "must be in [0, 1]")
    need(config.data.skip_rate_min_samples >= 1, "data.skip_rate_min_samples", "must be >= 1")
    need(0.0 <= config.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    need(0.0 < config.model.token_keep_rate <= 1.0, "model.token_keep_rate", "must be in (0, 1]")
    need(
        not set(config.model.arch) & _OWN_MODEL_KEYS,
        "model.arch",
        f"must not set {', '.join(sorted(_OWN_MODEL_KEYS))} (they have their own model.* / data.* keys)",
    )
    for key in ("objective.mim_weight", "objective.dino_weight", "objective.simclr_weight"):
        need(_get(config, key) >= 0, key, "must be >= 0")
    objective = config.objective
    need(
        objective.mim_weight + objective.dino_weight + objective.simclr_weight > 0,
        "objective.mim_weight",
        "at least one objective weight (mim, dino, simclr) must be > 0",
    )
    need(0.0 <= objective.mask_ratio < 1.0, "objective.mask_ratio", "must be in [0, 1)")
    need(
        objective.embedding == "default" or objective.mim_weight == objective.dino_weight == 0,
        "objective.embedding",
        "multiscale is for SimCLR only (set objective.mim_weight=0 and dino_weight=0)",
    )
    for key in (
        "objective.decoder_depth",
        "objective.decoder_dim",
        "objective.dino_out_dim",
        "objective.simclr_out_dim",
    ):
        need(_get(config, key) > 0, key, "must be > 0")
    for key in (
        "objective.student_temp",
        "objective.teacher_temp",
        "objective.warmup_teacher_temp",
        "objective.simclr_temperature",
    ):
        need(_get(config, key) > 0, key, "must be > 0")
    need(objective.warmup_teacher_temp_steps >= 0, "objective.warmup_teacher_temp_steps", "must be >= 0")
    need(0.0 <= objective.momentum_teacher <= 1.0, "objective.momentum_teacher", "must be in [0, 1]")
    optim = config.optim
    need(optim.lr > 0, "optim.lr", "must be > 0")
    need(optim.transformer_lr_scale > 0, "optim.transformer_lr_scale", "must be > 0")
    need(0 <= optim.min_lr <= optim.lr, "optim.min_lr", "must be in [0, optim.lr]")
    need(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(optim.weight_decay_end >= 0, "optim.weight_decay_end", "must be >= 0")
    need(0.0 <= optim.warmup_fraction < 1.0, "optim.warmup_fraction", "must be in [0, 1)")
    need(0.0 <= optim.beta1 < 1.0, "optim.beta1", "must be in [0, 1)")
    need(0.0 <= optim.beta2 < 1.0, "optim.beta2", "must be in [0, 1)")
    need(optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 = off)")
    need(0.0 < optim.layer_decay <= 1.0, "optim.layer_decay", "must be in (0, 1]")
    train = config.train
    need(train.steps > 0, "train.steps", "must be > 0")
    need(train.batch_size > 0, "train.batch_size", "must be > 0")
    need(
        train.batch_size % num_processes == 0,
        "train.batch_size",
        f"must be divisible by the number of processes ({num_processes})",
    )
    need(train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    need(
        (train.batch_size // num_processes) % train.grad_accum_steps == 0,
        "train.grad_accum_steps",
        "must divide the per-process batch size",
    )
    need(
        train.grad_accum_steps == 1 or objective.simclr_weight == 0,
        "train.grad_accum_steps",
        "is refused with SimCLR: in-batch negatives make accumulated micro-batches a different loss",
    )
    need(train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = only at the end)")
    need(train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(train.max_seconds >= 0, "train.max_seconds", "must be >= 0 (0 = no limit)")
    need(train.log_every >= 1, "train.log_every", "must be >= 1")
    need(train.knn_every >= 0, "train.knn_every", "must be >= 0 (0 = off)")
    need(train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(config.eval.knn_k >= 1, "eval.knn_k", "must be >= 1")
    need(config.eval.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    need(config.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(
        config.eval.image_size >= 0 and config.eval.image_size % 16 == 0,
        "eval.image_size",
        "must be 0 (pretraining size) or a multiple of 16",
    )
    need(config.eval.num_workers >= 0, "eval.num_workers", "must be >= 0")
    need(bool(config.eval.shots) and min(config.eval.shots) >= 1, "eval.shots", "must list integers >= 1")
    need(config.eval.seeds >= 1, "eval.seeds", "must be >= 1")
    need(
        bool(config.eval.methods) and set(config.eval.methods) <= set(FEWSHOT_METHODS),
        "eval.methods",
        f"must list some of {', '.join(FEWSHOT_METHODS)}",
    )
    need(0 < config.eval.linear_holdout < 1, "eval.linear_holdout", "must be in (0, 1)")


# ---------------------------------------------------------------------------------------------
# Derived values: computed in one place and logged
# ---------------------------------------------------------------------------------------------


def derived_values(config: Config, num_processes: int = 1) -> dict[str, Any]:
    """Everything computed from the config rather than set directly."""
    per_process_batch = config.train.batch_size // num_processes
    return {
        "num_processes": num_processes,
        "per_process_batch_size": per_process_batch,
        "micro_batch_size": per_process_batch // config.train.grad_accum_steps,
        # Linear scaling rule: lr is quoted per 256 images.
        "effective_lr": config.optim.lr * config.train.batch_size / 256,
        "effective_min_lr": config.optim.min_lr * config.train.batch_size / 256,
        "warmup_steps": int(math.floor(config.optim.warmup_fraction * config.train.steps)),
        "teacher_temp_warmup_steps": min(config.objective.warmup_teacher_temp_steps, config.train.steps),
        "images_seen": config.train.steps * config.train.batch_size,
    }


# What only one objective reads (dotted config keys, derived values, schedule names): the logs (derived values,
# metrics.jsonl, TensorBoard hparams) leave them out when that objective is off, so a SimCLR run shows no DINO
# teacher schedule. config.yaml keeps every key (resume compares it whole).
OBJECTIVE_ONLY = {
    "mim_weight": (
        "objective.mask_ratio",
        "objective.norm_pix_loss",
        "objective.decoder_depth",
        "objective.decoder_dim",
    ),
    "dino_weight": (
        "objective.dino_out_dim",
        "objective.student_temp",
        "objective.teacher_temp",
        "objective.warmup_teacher_temp",
        "objective.warmup_teacher_temp_steps",
        "objective.momentum_teacher",
        "teacher_temp_warmup_steps",
        "teacher_temp",
        "momentum",
    ),
    "simclr_weight": ("objective.simclr_temperature", "objective.simclr_out_dim", "objective.embedding"),
}


def unused_settings(config: Config) -> set[str]:
    """The OBJECTIVE_ONLY names of the objectives this config turns off (weight 0)."""
    return {key for weight, keys in OBJECTIVE_ONLY.items() if getattr(config.objective, weight) <= 0 for key in keys}


def log_derived(config: Config, num_processes: int = 1) -> dict[str, Any]:
    values = derived_values(config, num_processes)
    unused = unused_settings(config)
    for key, value in values.items():
        if key not in unused:
            log.info("derived %s = %s", key, value)
    return values


# ---------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_dict(values: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config from a saved dict (e.g. a checkpoint's), with the same strict checks."""
    cfg = _merge(OmegaConf.structured(Config), values, source)
    config = cast(Config, OmegaConf.to_object(cfg))
    validate(config, source=source)
    return config


def is_folder_name(name: str) -> bool:
    """One path component that stays where it is put: no separator (either OS's), not '.' or '..', no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def run_dir(config: Config) -> Path:
    """``<train.output_dir>/<name>``, refused (ConfigError) when it resolves outside the output folder (a symlink
    out of it): every command that writes or deletes a run goes through here."""
    output = Path(config.train.output_dir)
    if not is_folder_name(config.name):  # configs built without load_config (tests, notebooks) are checked too
        raise ConfigError(f"config: key 'name' = {config.name!r}: must be one folder name inside train.output_dir")
    directory = output / config.name
    if directory.resolve().parent != output.resolve():
        raise ConfigError(
            f"{directory}: the run folder resolves to {directory.resolve()}, outside train.output_dir "
            f"{output}; choose another name="
        )
    return directory


def write_config(config: Config, directory: Path) -> Path:
    """Write the resolved config as <directory>/config.yaml (atomically)."""
    from ssl_hybrid.runs import write_text_atomic  # runs imports this module

    return write_text_atomic(directory / "config.yaml", lambda handle: handle.write(to_yaml(config)))


def describe_fields(schema: type | None = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, reason) for every config field, in declaration order; the reason is the field's
    ``metadata["help"]`` (see :func:`option`)."""
    rows: list[tuple[str, Any, str]] = []
    defaults = (schema or Config)()
    for item in dataclasses.fields(defaults):
        value = getattr(defaults, item.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_fields(type(value), f"{prefix}{item.name}."))
        else:
            rows.append((f"{prefix}{item.name}", value, item.metadata.get("help", "")))
    return rows
