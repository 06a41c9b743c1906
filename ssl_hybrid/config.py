"""Typed configuration: every default lives here, with a one-line reason.

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

import dataclasses
import difflib
import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_hybrid.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = "data/pets37"  # the embedded default corpus (shards + manifest.json), see data/README.md


@dataclass
class DataConfig:
    # Shards: a directory holding manifest.json, a pattern ("s-{000000..000009}.tar"), a .txt list or URLs
    # or an image folder (sharded once into $SSL_HYBRID_CACHE; run `ssl-hybrid shards` to control how).
    train: str = DEFAULT_CORPUS
    # Labeled set (image folder with class sub-folders or labeled shards) for the online k-NN monitor; "" = off.
    val: str = ""
    # 2 workers keep decoding + augmentation off the training process on a small machine; raise on GPUs.
    num_workers: int = 2
    # 224 px is the size every reference number (DINO, MAE, timm) is quoted at.
    image_size: int = 224
    # Local crops for multi-crop DINO; 96 px is DINO's default.
    local_image_size: int = 96
    # DINO uses 2 global + several local crops; 0 local crops halves the step cost on small machines.
    num_local_views: int = 0
    # Which lightly transform makes the views: dino (multi-crop), simclr, or mae (one light crop).
    views: str = "dino"
    # SimCLR views: smallest crop share (SimCLR's 0.08 at ImageNet scale; small images and corpora want more
    # context per view), the Gaussian blur probability (lightly's 0.5; its CIFAR recipe turns blur off) and
    # the colour-jitter strength (lightly's 1.0; lower keeps colour, a cue for flowers, pets and birds).
    simclr_min_scale: float = 0.08
    simclr_blur: float = 0.5
    simclr_color_jitter: float = 1.0
    # Sample shuffle buffer over compressed bytes; 1000 mixes shards well at a few MB of memory.
    shuffle_buffer: int = 1000
    # Infinite resampled shards for training, so every rank gets the same number of batches.
    resampled: bool = True
    # Stop the run when more than this share of samples is corrupt: a few bad files are normal, 10% is not.
    max_skip_rate: float = 0.1
    # The skip rate is only judged after this many samples (and at each worker-epoch end): 1 bad of 3 is noise.
    skip_rate_min_samples: int = 100


@dataclass
class ModelConfig:
    # Any timm model name; resvit_* and hybrid_* are registered by ``import ssl_hybrid.models``. resvit_tiny (batch-normed
    # conv stages + 4 ViT blocks) learns fastest of ours at small budgets (benchmarks/results/label_efficiency).
    name: str = "resvit_tiny"
    # Stochastic depth; 0.1 is the ViT-S/DINO setting and harmless for small models.
    drop_path_rate: float = 0.1
    # Attention in the transformer stages: global | window | topk (sparse options trade accuracy for speed).
    attn_mode: str = "global"
    # Token selection keep rate at the selection blocks; 1.0 = off (pretraining wants every token).
    token_keep_rate: float = 1.0
    # Activation checkpointing trades ~30% more compute for much less memory on large models.
    grad_checkpointing: bool = False
    # Architecture kwargs passed to the model factory over its defaults (e.g. {conv_dims: [32, 64], depth: 6});
    # written by `ssl-hybrid search` for its chosen candidate. {} = the named variant as registered.
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    # Loss weights; an objective with weight 0 is not built. Default: joint MIM + DINO (iBOT/CMAE-like).
    mim_weight: float = 1.0
    dino_weight: float = 1.0
    simclr_weight: float = 0.0
    # MAE: 75% of the 16x16-stride grid hidden; the speed-up and the difficulty both come from it.
    mask_ratio: float = 0.75
    # MAE's normalized-pixel target gives better features than raw pixels.
    norm_pix_loss: bool = True
    # A light decoder (MAE uses 8 x 512; ConvMAE-small 4 x 256 is enough at our scale).
    decoder_depth: int = 2
    decoder_dim: int = 256
    # DINO head output; 65536 is DINO's ImageNet setting, 4096 suits small corpora.
    dino_out_dim: int = 4096
    # Student temperature 0.1 and teacher 0.04 -> 0.07 warm-up are DINO's defaults.
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    # Teacher temperature warm-up length in steps (DINO: 30 of 100 epochs).
    warmup_teacher_temp_steps: int = 1000
    # EMA teacher momentum, cosine from this base to 1.0 (DINO's 0.996 for long runs; lower learns faster).
    momentum_teacher: float = 0.996
    # SimCLR NT-Xent temperature; 0.1 works at small and large batch sizes.
    simclr_temperature: float = 0.1
    # SimCLR projection output dimension (SimCLR paper: 128).
    simclr_out_dim: int = 128
    # What the SimCLR head sees: default (the backbone's pooled feature) or multiscale (every conv stage pooled,
    # + class token + patch mean: the conv stages get the loss's gradient directly). SimCLR only.
    embedding: str = "default"


@dataclass
class OptimConfig:
    # Base learning rate per 256 images; the effective lr scales linearly with the global batch (Goyal et al.).
    lr: float = 5e-4
    # Cosine decay ends here rather than at 0 so late steps still learn (DINO: 1e-6).
    min_lr: float = 1e-6
    # AdamW weight decay, cosine from weight_decay to weight_decay_end (DINO: 0.04 -> 0.4).
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    # Linear warm-up as a share of the total steps; 10% keeps early large-lr steps from diverging.
    warmup_fraction: float = 0.1
    # AdamW betas; 0.95 for beta2 is MAE's choice for stable large-batch pretraining.
    beta1: float = 0.9
    beta2: float = 0.95
    # Global grad-norm clip; 3.0 is DINO's value. 0 = off.
    clip_grad: float = 3.0
    # Layer-wise lr decay for fine-tuning (BEiT/MAE); 1.0 = off. Pretraining ignores it.
    layer_decay: float = 1.0
    # lr multiplier for the backbone's transformer part (ViT blocks, class token, position table); 1.0 = one lr.
    # At CPU budgets ViT blocks collapse at an lr the batch-normed conv stages learn fast with.
    transformer_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    # Run directories are <output_dir>/<name>.
    output_dir: str = "runs"
    # Count in steps, not epochs (dinov2): a streaming corpus has no natural epoch.
    steps: int = 1000
    # Global batch size, split evenly across processes.
    batch_size: int = 64
    # One seed for model init, data order and augmentations, so runs are reproducible.
    seed: int = 0
    # Save a resumable checkpoint this often (steps); 0 = only at the end.
    checkpoint_every: int = 500
    # Keep the newest K complete checkpoints; older ones are deleted after a new one is complete.
    keep_checkpoints: int = 2
    # Wall-clock budget in seconds: stop cleanly with a checkpoint and the export when it runs out; 0 = none.
    max_seconds: float = 0.0
    # no | bf16 | fp16; bf16 is the safe default on GPUs that have it, "no" on CPU.
    mixed_precision: str = "no"
    # Accumulate gradients over this many micro-batches (refused for in-batch-negative losses like SimCLR).
    grad_accum_steps: int = 1
    # Log metrics every N steps.
    log_every: int = 10
    # Online k-NN monitor on data.val every N steps; 0 = off.
    knn_every: int = 0
    # Stop after this many non-finite losses in a row (single spikes are skipped and counted).
    max_nonfinite_steps: int = 5


@dataclass
class EvalConfig:
    # DINO's k-NN protocol: k=20 headline, temperature 0.07, votes weighted by exp(sim / T).
    knn_k: int = 20
    knn_temperature: float = 0.07
    # Feature extraction batch size; inference only, so larger than training.
    batch_size: int = 128
    # Evaluation image size; 0 = the size the backbone was pretrained at.
    image_size: int = 0
    # Frozen-feature pooling: multiscale (every conv stage + class token + patch mean, each L2-normalized) uses
    # the local detail of the early stages that a single pooled vector drops; backbones without a pyramid
    # (plain ViTs) fall back to default (the model's own pre-logits pooling).
    pooling: str = "multiscale"


@dataclass
class Config:
    # Run name; the run directory is <train.output_dir>/<name>.
    name: str = "run"
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
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(value, DictConfig):
            keys.extend(known_keys(value, f"{dotted}."))
    return keys


def unknown_key_message(key: str, known: list[str]) -> str:
    """"unknown key 'train.stpes' — did you mean 'train.steps'?" (difflib's closest match, when close).
    Within an existing group only that group's keys compete, so the shared prefix cannot make a match."""
    group, _, last = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
    if group and group in known:
        match = [f"{group}.{m}" for m in difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)]
    else:
        match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key '{key}'" + (f" — did you mean '{match[0]}'?" if match else "")


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
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


def load_layered(schema: Any, recipe: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Any:
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


def load_config(recipe: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
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
    "model.attn_mode": ("global", "window", "topk"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "eval.pooling": ("multiscale", "default"),
    "objective.embedding": ("default", "multiscale"),
}


# model.arch may not shadow these: each has its own config key, and two sources for one value would disagree.
_OWN_MODEL_KEYS = {"img_size", "num_classes", "pretrained", "drop_path_rate", "attn_mode", "token_keep_rate"}


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
    need(bool(config.name) and "/" not in config.name, "name", "must be a non-empty name without '/'")
    need(bool(config.data.train), "data.train", "must name shards, a shard directory or an image folder")
    need(config.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(config.data.image_size > 0 and config.data.image_size % 16 == 0, "data.image_size",
         "must be a positive multiple of 16 (the patch grid stride)")
    need(config.data.local_image_size > 0, "data.local_image_size", "must be > 0")
    need(config.data.num_local_views >= 0, "data.num_local_views", "must be >= 0")
    need(0.0 < config.data.simclr_min_scale <= 1.0, "data.simclr_min_scale", "must be in (0, 1]")
    need(0.0 <= config.data.simclr_blur <= 1.0, "data.simclr_blur", "must be in [0, 1]")
    need(0.0 <= config.data.simclr_color_jitter <= 1.0, "data.simclr_color_jitter", "must be in [0, 1]")
    need(config.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    need(0.0 <= config.data.max_skip_rate <= 1.0, "data.max_skip_rate", "must be in [0, 1]")
    need(config.data.skip_rate_min_samples >= 1, "data.skip_rate_min_samples", "must be >= 1")
    need(0.0 <= config.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    need(0.0 < config.model.token_keep_rate <= 1.0, "model.token_keep_rate", "must be in (0, 1]")
    need(not set(config.model.arch) & _OWN_MODEL_KEYS, "model.arch",
         f"must not set {', '.join(sorted(_OWN_MODEL_KEYS))} (they have their own model.* / data.* keys)")
    for key in ("objective.mim_weight", "objective.dino_weight", "objective.simclr_weight"):
        need(_get(config, key) >= 0, key, "must be >= 0")
    objective = config.objective
    need(objective.mim_weight + objective.dino_weight + objective.simclr_weight > 0, "objective.mim_weight",
         "at least one objective weight (mim, dino, simclr) must be > 0")
    need(0.0 <= objective.mask_ratio < 1.0, "objective.mask_ratio", "must be in [0, 1)")
    need(objective.embedding == "default" or objective.mim_weight == objective.dino_weight == 0,
         "objective.embedding", "multiscale is for SimCLR only (set objective.mim_weight=0 and dino_weight=0)")
    for key in ("objective.decoder_depth", "objective.decoder_dim", "objective.dino_out_dim",
                "objective.simclr_out_dim"):
        need(_get(config, key) > 0, key, "must be > 0")
    for key in ("objective.student_temp", "objective.teacher_temp", "objective.warmup_teacher_temp",
                "objective.simclr_temperature"):
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
    need(train.batch_size % num_processes == 0, "train.batch_size",
         f"must be divisible by the number of processes ({num_processes})")
    need(train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    need((train.batch_size // num_processes) % train.grad_accum_steps == 0, "train.grad_accum_steps",
         "must divide the per-process batch size")
    need(train.grad_accum_steps == 1 or objective.simclr_weight == 0, "train.grad_accum_steps",
         "is refused with SimCLR: in-batch negatives make accumulated micro-batches a different loss")
    need(train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = only at the end)")
    need(train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(train.max_seconds >= 0, "train.max_seconds", "must be >= 0 (0 = no limit)")
    need(train.log_every >= 1, "train.log_every", "must be >= 1")
    need(train.knn_every >= 0, "train.knn_every", "must be >= 0 (0 = off)")
    need(train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(config.eval.knn_k >= 1, "eval.knn_k", "must be >= 1")
    need(config.eval.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    need(config.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(config.eval.image_size >= 0 and config.eval.image_size % 16 == 0, "eval.image_size",
         "must be 0 (pretraining size) or a multiple of 16")


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


def log_derived(config: Config, num_processes: int = 1) -> dict[str, Any]:
    values = derived_values(config, num_processes)
    for key, value in values.items():
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
    config = OmegaConf.to_object(cfg)
    validate(config, source=source)
    return config


def run_dir(config: Config) -> Path:
    return Path(config.train.output_dir) / config.name


def write_config(config: Config, directory: Path) -> Path:
    """Write the resolved config as <directory>/config.yaml (atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(config), encoding="utf-8")
    tmp.replace(target)
    return target


GROUPS = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig,
          "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig}


def describe_fields() -> list[tuple[str, Any, str]]:
    """(dotted key, default, reason) for every config field; the reason is the comment above the field."""
    rows: list[tuple[str, Any, str]] = [("name", Config.name, _comment_for(Config, "name"))]
    for group, schema in GROUPS.items():
        defaults = schema()
        for item in dataclasses.fields(schema):
            rows.append((f"{group}.{item.name}", getattr(defaults, item.name), _comment_for(schema, item.name)))
    return rows


def _comment_for(schema: type, name: str) -> str:
    """The '# ...' block above a field; a block covers the consecutive fields right below it."""
    lines = [line.strip() for line in inspect.getsource(schema).splitlines()]
    index = next((i for i, line in enumerate(lines) if line.startswith(f"{name}:")), None)
    if index is None:
        return ""
    back = index - 1
    while back >= 0 and lines[back] and not lines[back].startswith("#") and ":" in lines[back] \
            and not lines[back].startswith(("class ", "@", '"""')):
        back -= 1  # skip sibling fields that share the comment block
    comments: list[str] = []
    while back >= 0 and lines[back].startswith("#"):
        comments.insert(0, lines[back].lstrip("#").strip())
        back -= 1
    return " ".join(comments)
