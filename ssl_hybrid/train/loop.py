"""The pretraining job: wiring (``pretrain``) apart from the step (``train_step``) apart from the math
(``ssl_hybrid.objectives``), MAE-style.

One code path for a CPU, one GPU, or many GPUs/nodes (Hugging Face Accelerate). Counting is in
optimizer steps; every scheduled value is ``schedules[name][step]``. The run directory holds
``config.yaml`` (written at start), ``metrics.jsonl``, TensorBoard events, ``checkpoints/step_*/``
and, at the end, the model folder ``model/`` (``model.safetensors`` + ``config.json`` + ``README.md``).

Stopping: ``train.steps`` reached, ``train.max_seconds`` spent (checkpoint + export), SIGTERM/SIGINT
(checkpoint, exit cleanly; re-running the same command resumes), or ``train.max_nonfinite_steps``
non-finite steps in a row (a non-finite loss or gradient norm on any rank skips the step; stop with an
error; the last good checkpoint stays the newest).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_hybrid import rng, runs
from ssl_hybrid.config import Config, log_derived, run_dir, to_dict, unused_settings, validate
from ssl_hybrid.errors import UserError
from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train.optim import apply_schedule, build_optimizer
from ssl_hybrid.train.schedules import build_schedules

log = logging.getLogger(__name__)

# embedding_std is ~1 for spread-out embeddings and 0 when every image maps to the same vector.
COLLAPSE_STD = 0.05
STATE_FORMAT = "ssl_hybrid-train/1"


class NonFiniteLossError(UserError):
    """Too many non-finite losses in a row."""


@dataclass
class Counters:
    """Everything about the run's progress that a checkpoint must restore besides weights and RNG."""

    step: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    images: int = 0
    last_skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Run:
    """The live objects of one job."""

    config: Config
    accelerator: Any
    directory: Path
    model: Any  # the prepared (possibly DDP-wrapped) PretrainModel
    raw_model: PretrainModel
    optimizer: Any
    schedules: dict[str, np.ndarray]
    stream: Any
    counters: Counters = field(default_factory=Counters)
    monitor: Any = None
    stop_reason: str | None = None
    # This session only (a resumed run started at start_step); not checkpointed, so resume stays exact.
    start_step: int = 0
    train_seconds: float = 0.0
    startup_seconds: float = 0.0  # to the end of the session's first step (workers, first forward): not a step time
    # What the shard manifests say the data is (data.shards.manifest_fingerprint); checkpointed, checked on resume.
    data_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def model_kwargs(config: Config) -> dict[str, Any]:
    """Factory kwargs of the backbone besides its name and image size (model.arch first, then our keys).

    ``model.attn_mode``/``model.token_keep_rate`` go to every model whose constructor takes them (every preset of
    the hybrid family, whatever its name); set for a model without them (a timm ResNet) they are a ConfigError,
    never dropped. Unknown names are left to the factory's own error.
    """
    import timm

    import ssl_hybrid.models  # noqa: F401  (registers resvit_*/hybrid_* with timm)
    from ssl_hybrid.errors import ConfigError
    from ssl_hybrid.models.factory import factory_arguments

    kwargs: dict[str, Any] = dict(config.model.arch)
    name = config.model.name
    accepted = factory_arguments(name) if timm.is_model(name) else frozenset(("attn_mode", "token_keep_rate"))
    for key, value, off in (
        ("attn_mode", config.model.attn_mode, "global"),
        ("token_keep_rate", config.model.token_keep_rate, 1.0),
    ):
        if key in accepted and (key == "attn_mode" or value != off):
            kwargs[key] = value
        elif key not in accepted and value != off:
            raise ConfigError(f"model.{key}={value!r}: {name} has no {key} (an option of the resvit_*/hybrid_* family)")
    return kwargs


def build_backbone(config: Config) -> torch.nn.Module:
    import ssl_hybrid.models  # noqa: F401  (registers hybrid_* with timm)
    from ssl_hybrid.models.factory import create_backbone

    backbone = create_backbone(
        config.model.name, config.data.image_size, drop_path_rate=config.model.drop_path_rate, **model_kwargs(config)
    )
    if config.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def training_meta(config: Config) -> dict[str, Any]:
    """What the trainer adds to ``backbone.json`` (checkpoints) and the model folder's record besides how to rebuild the
    backbone (``models.export.make_meta`` reads that from the model): pretraining image size, run, objective."""
    return {
        "image_size": config.data.image_size,
        "run": config.name,
        "objective": {k: v for k, v in to_dict(config)["objective"].items() if k.endswith("_weight")},
    }


def make_accelerator(config: Config, directory: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Every parameter gets a gradient in every step of each objective (tested), so DDP needs no
    # unused-parameter search.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    # Without a GPU, say cpu=True so that torchrun-launched processes form a gloo group (MULTI_CPU);
    # Accelerate otherwise treats each of them as a lone process.
    return Accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with="tensorboard",
        project_dir=str(directory),
        kwargs_handlers=[ddp],
        cpu=not torch.cuda.is_available(),
    )


def sync_flags(accelerator, *flags: float) -> list[float]:
    """Max of each flag over every process (so all ranks take the same branch)."""
    values = torch.tensor(flags, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values.tolist()


def mask_generator(config: Config, step: int, view: int, rank: int) -> torch.Generator:
    """Masks are a pure function of (seed, step, view, rank): nothing to checkpoint."""
    seed = np.random.SeedSequence([config.train.seed, step, view, rank, 0x6D61736B]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def add_masks(run: Run, batch: dict, step: int) -> dict:
    """Masks for the rank's whole batch (before any micro-batch split, so accumulation changes nothing)."""
    if not run.raw_model.uses_masks:
        return dict(batch, masks=None)
    from ssl_hybrid.models.masking import random_grid_mask

    rank = run.accelerator.process_index
    masks = []
    for index, view in enumerate(batch["global_views"]):
        size, _, height, width = view.shape
        generator = mask_generator(run.config, step, index, rank)
        mask = random_grid_mask(size, height // 16, width // 16, run.config.objective.mask_ratio, generator)
        masks.append(mask.to(view.device))
    return dict(batch, masks=masks)


def split_micro(batch: dict, parts: int) -> list[dict]:
    """Split a rank's batch into ``parts`` micro-batches for gradient accumulation."""
    if parts == 1:
        return [batch]
    chunks: list[dict[str, Any]] = [
        dict(global_views=[], local_views=[], masks=None if batch["masks"] is None else []) for _ in range(parts)
    ]
    for key in ("global_views", "local_views", "masks"):
        for view in batch[key] or []:
            for chunk, piece in zip(chunks, view.chunk(parts)):
                chunk[key].append(piece)
    return chunks


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        "global_views": [v.to(device, non_blocking=True) for v in batch["global_views"]],
        "local_views": [v.to(device, non_blocking=True) for v in batch["local_views"]],
        "key": batch.get("key", []),
    }


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------


def forward_losses(run: Run, micro: dict, step: int) -> tuple[dict, dict]:
    with run.accelerator.autocast():
        return run.model(
            micro["global_views"], micro["local_views"], micro["masks"], float(run.schedules["teacher_temp"][step])
        )


def train_step(run: Run, batch: dict, step: int) -> dict[str, float]:
    """Forward/backward over the micro-batches, then clip + step + EMA, or skip when the loss or the gradient
    norm is not finite on any rank (an fp16 overflow is an infinite gradient norm: the step the grad scaler
    skips is skipped here too, never counted as a good one)."""
    accelerator, config = run.accelerator, run.config
    apply_schedule(run.optimizer, float(run.schedules["lr"][step]), float(run.schedules["weight_decay"][step]))
    micros = split_micro(add_masks(run, batch, step), config.train.grad_accum_steps)
    totals: dict[str, float] = {}
    stats: dict[str, float] = {}
    loss_finite = True
    # A forward updates BatchNorm running statistics before its loss is known: a skipped step restores them.
    buffers = [(buffer, buffer.detach().clone()) for buffer in run.raw_model.buffers()]
    for index, micro in enumerate(micros):
        last = index == len(micros) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(run.model)
        with sync:
            losses, step_stats = forward_losses(run, micro, step)
            # Every rank runs every backward (no rank-local break, so DDP's gradient all-reduce never waits
            # for a rank that stopped); a non-finite loss is agreed on below, with the gradient norm.
            loss_finite = loss_finite and bool(torch.isfinite(losses["loss"].detach()).all())
            accelerator.backward(losses["loss"] / len(micros))
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / len(micros)
        stats = {k: float(v) for k, v in step_stats.items()}
    grad_norm = clip_gradients(run)
    bad_loss, bad_grad = sync_flags(
        accelerator, 0.0 if loss_finite else 1.0, 0.0 if np.isfinite(grad_norm) else 1.0
    )  # one all-reduce for both
    if bad_loss or bad_grad:
        skip_step(run, buffers)
        return {
            "nonfinite": 1.0,
            "nonfinite_loss": bad_loss,
            "nonfinite_grad_norm": bad_grad,
            "fp16_overflow": float(scaler_overflow(run, bool(bad_loss))),
        }
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.raw_model.after_good_step(float(run.schedules["momentum"][step]))
    return {**totals, **stats, "grad_norm": grad_norm}


def skip_step(run: Run, buffers: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
    """Drop the step's gradients and restore the model's ``(buffer, value before the step)`` pairs, without
    touching the weights, the optimizer state or the EMA teacher."""
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    scaler = run.accelerator.scaler
    if scaler is not None:
        # clip_gradients unscaled (and inf-checked) this step's gradients: update() backs the fp16 loss scale
        # off and resets the scaler for the next step, as the skipped scaler.step() would have.
        scaler.update()
    run.raw_model.after_skipped_step()


def scaler_overflow(run: Run, bad_loss: bool) -> bool:
    """An fp16 overflow the grad scaler is still backing off from: a finite loss, an infinite gradient norm and
    a loss scale still at least 1 after skip_step's back-off (pushed below 1, the gradients are bad at any
    scale). Such steps are skipped but not counted towards train.max_nonfinite_steps: an fp16 run skips
    several in a row at its start while the scale comes down from 2**16, as torch.amp.GradScaler is designed to."""
    scaler = run.accelerator.scaler
    return scaler is not None and not bad_loss and float(scaler.get_scale()) >= 1.0


def clip_gradients(run: Run) -> float:
    """The total gradient norm (unscaled under fp16), after clipping to optim.clip_grad when it is > 0."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    if run.config.optim.clip_grad > 0:
        return float(run.accelerator.clip_grad_norm_(params, run.config.optim.clip_grad))
    run.accelerator.unscale_gradients()  # a no-op without an fp16 grad scaler
    grads = [p.grad.detach() for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def shared_state(run: Run) -> dict[str, Any]:
    accelerator = run.accelerator
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
    return {
        "format": STATE_FORMAT,
        "optimizer": run.optimizer.state_dict(),
        "scaler": scaler,
        "schedules": ckpt.schedules_to_tensors(run.schedules),
        "counters": run.counters.as_dict(),
        "config": to_dict(run.config),
        "data_fingerprint": run.data_fingerprint,
    }


def save(run: Run) -> Path:
    from ssl_hybrid.models.export import make_meta

    rank_state = {"rng": rng.capture(), "stream": run.stream.state_dict()}
    return ckpt.save_checkpoint(
        run.directory,
        run.counters.step,
        run.raw_model,
        shared_state(run),
        rank_state,
        run.config,
        make_meta(run.raw_model.backbone, training_meta(run.config)),
        run.accelerator,
    )


def resume(run: Run, path: Path, loaded: dict[str, Any]) -> None:
    ckpt.load_model_state(run.raw_model, loaded["model"], path)
    state = loaded["state"]
    run.optimizer.load_state_dict(state["optimizer"])
    if run.accelerator.scaler is not None and state["scaler"]:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    for name, values in state["schedules"].items():
        if not np.array_equal(values.numpy(), run.schedules[name]):
            raise ckpt.CheckpointError(f"{path}: schedule '{name}' differs from this config's")
    run.counters = Counters(**state["counters"])
    run.stream.load_state_dict(loaded["rank"]["stream"])
    rng.restore(loaded["rank"]["rng"])
    log.info("resumed from %s (step %d of %d)", path, run.counters.step, run.config.train.steps)


# ---------------------------------------------------------------------------------------------
# Signals, logging, monitoring
# ---------------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the current step; a second
    SIGINT interrupts immediately."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = name
        log.warning("%s received: stopping at the next safe point (the end of this step, with a checkpoint)", name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def log_step(run: Run, values: dict[str, float], seconds: float, images: int, bar) -> None:
    step = run.counters.step
    unused = unused_settings(run.config)  # DINO's momentum/teacher_temp only when DINO is on
    record = {
        "step": step,
        **{
            name: float(run.schedules[name][step - 1])
            for name in ("lr", "weight_decay", "momentum", "teacher_temp")
            if name not in unused
        },
        "img_per_s": images / seconds if seconds > 0 else 0.0,
        "nonfinite_total": run.counters.nonfinite_total,
        **values,
    }
    data = run.stream.stats()
    record.update(data_seen=data["seen"], data_skipped=data["skipped"], data_epoch=data["epoch"])
    if data["skipped"] > run.counters.last_skipped:
        log.warning(
            "%d corrupt/unreadable samples skipped so far (%.2f%% of %d read); see warnings above",
            data["skipped"],
            100 * data["skip_rate"],
            data["seen"],
        )
        run.counters.last_skipped = data["skipped"]
    if values.get("embedding_std", 1.0) < COLLAPSE_STD or values.get("teacher_std", 1.0) < COLLAPSE_STD:
        log.warning(
            "step %d: embeddings are collapsing (std across the batch %.4f, teacher %.4f; ~1 is healthy)",
            step,
            values.get("embedding_std", float("nan")),
            values.get("teacher_std", float("nan")),
        )
    if run.accelerator.is_main_process:
        runs.append_metrics(run.directory, record)
    run.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
    if bar is not None:
        bar.set_postfix(
            loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['img_per_s']:.1f}"
        )


def run_monitor(run: Run) -> None:
    if run.monitor is None:
        return
    with rng.preserved():  # the monitor must not shift training randomness (resume would diverge)
        result = run.monitor.evaluate(run.raw_model.backbone, run.accelerator)
    run.model.train()
    record = {"step": run.counters.step, **{f"knn_{k}": v for k, v in result.items()}}
    log.info(
        "online k-NN on %s at step %d: top-1 %.1f%% (chance %.1f%%; k=%d, %d images, leave-one-out)",
        result["corpus"],
        run.counters.step,
        100 * result["top1"],
        100 / result["num_classes"],
        result["k"],
        result["n_test"],
    )
    if run.accelerator.is_main_process:
        runs.append_metrics(run.directory, record)
    run.accelerator.log({"knn_top1": result["top1"], "knn_top5": result["top5"]}, step=run.counters.step)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def setup(config: Config, fresh: bool = False, held: contextlib.ExitStack | None = None) -> Run:
    """Build the run; the run folder is claimed (its lock entered into ``held``), checked against this config
    and its data, or deleted (``fresh``) only after the model and the data stream have been built."""
    from accelerate.utils import set_seed

    from ssl_hybrid.data.shards import manifest_fingerprint
    from ssl_hybrid.data.stream import build_train_stream
    from ssl_hybrid.data.views import build_transform

    directory = run_dir(config)
    accelerator = make_accelerator(config, directory)
    validate(config, source="config", num_processes=accelerator.num_processes)
    derived = log_derived(config, accelerator.num_processes)
    set_seed(config.train.seed)  # identical initial weights on every process
    raw_model = PretrainModel(build_backbone(config), ObjectiveSettings.from_config(config))
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    optimizer = build_optimizer(raw_model, config.optim)
    stream = build_train_stream(
        config.data,
        derived["per_process_batch_size"],
        config.train.seed,
        accelerator.process_index,
        accelerator.num_processes,
        build_transform(config.data),
    )
    fingerprint = manifest_fingerprint(stream.urls)
    existing = open_run_folder(accelerator, config, fresh, fingerprint, held)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    run = Run(
        config,
        accelerator,
        directory,
        model,
        raw_model,
        optimizer,
        build_schedules(config, accelerator.num_processes),
        stream,
        data_fingerprint=fingerprint,
    )
    # Per-rank randomness (drop-path, augment fallbacks) differs across ranks but is reproducible.
    set_seed(config.train.seed + accelerator.process_index)
    if existing is not None:
        resume(run, *existing)
    run.monitor = build_monitor(config)
    # TensorBoard events land in <run>/tensorboard/ (`tensorboard --logdir runs` compares runs).
    accelerator.init_trackers("tensorboard", config=flat_hparams(config))
    run.start_step = run.counters.step
    log.info("%s: %d processes on %s", config.name, accelerator.num_processes, accelerator.device)
    log_precision(accelerator)
    log.info("parameters: %s", describe_parameters(raw_model))
    return run


def open_run_folder(
    accelerator, config: Config, fresh: bool, fingerprint: str | None, held: contextlib.ExitStack | None
) -> tuple[Path, dict[str, Any]] | None:
    """Claim the run folder (main process), start it over (``fresh``) or refuse it when its config.yaml, newest
    readable checkpoint or data differ from this run's, then write config.yaml. Returns (checkpoint, loaded) to
    resume from, or None. Nothing in the folder is written or deleted before every check has passed."""
    directory = run_dir(config)

    def claim_and_check() -> None:
        if held is not None:
            held.enter_context(runs.claim(directory))
        if fresh:
            runs.start_fresh(directory)
        else:  # a save killed between the two renames of its swap gets its step back before the listing
            runs.restore_replaced(directory / runs.CHECKPOINTS_DIR)
            ckpt.check_run_config(directory, config)

    on_main(accelerator, claim_and_check)
    existing, unreadable = (None, []) if fresh else newest_readable(accelerator, config, directory)
    if existing is not None:
        ckpt.check_data(existing[1]["state"].get("data_fingerprint"), fingerprint, config, existing[0])

    def prepare() -> None:
        for path in unreadable:
            log.warning("set aside the unreadable checkpoint %s as %s", path, ckpt.set_aside(path).name)
        runs.prepare_run_dir(config)
        ckpt.remove_partial(directory)

    on_main(accelerator, prepare)
    return existing


def newest_readable(accelerator, config: Config, directory: Path):
    """((path, loaded) of the newest checkpoint every process can read, or None; the unreadable newer ones).
    A checkpoint of another config is refused (CheckpointError), never skipped."""
    unreadable: list[Path] = []
    for path in reversed(ckpt.list_checkpoints(directory)):
        loaded, failure, refusal = None, None, None
        try:
            loaded = ckpt.load_checkpoint(path, config, accelerator.process_index)
        except ckpt.UnreadableCheckpoint as err:
            failure = err
        except ckpt.CheckpointError as err:
            refusal = err
        failed, refused = sync_flags(accelerator, float(failure is not None), float(refusal is not None))
        if refused:
            raise refusal or ckpt.CheckpointError(f"{path}: refused on another process (see its error)")
        if not failed:
            return (path, loaded), unreadable
        log.warning(
            "%s; falling back to the previous complete checkpoint", failure or f"{path}: unreadable on another process"
        )
        unreadable.append(path)
    if unreadable:
        raise ckpt.CheckpointError(
            f"{unreadable[0]}: unreadable, and no older checkpoint can be read either; move "
            f"{directory / runs.CHECKPOINTS_DIR} away or start over with --fresh"
        )
    return None, unreadable


def on_main(accelerator, action) -> None:
    """Run ``action`` on the main process only; if it raises a UserError, every process raises (no process waits
    at a barrier for a main process that gave up)."""
    error: UserError | None = None
    if accelerator.is_main_process:
        try:
            action()
        except UserError as err:
            error = err
    if sync_flags(accelerator, float(error is not None))[0]:
        raise error or UserError(f"rank {accelerator.process_index}: the main process stopped (see its error)")


# What each part of the pretraining model is, for the start-up parameter count.
PART_NAMES = {
    "backbone": "backbone",
    "mim": "MIM decoder",
    "dino": "DINO head",
    "simclr": "SimCLR head",
    "teacher": "EMA teacher",
}


def parameter_counts(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "frozen": n}} per top-level part (backbone, objective heads, teacher);
    a parameter shared by two parts counts once, in the first."""
    seen: set[int] = set()
    counts: dict[str, dict[str, int]] = {}
    for name, child in model.named_children():
        part = counts.setdefault(name, {"trainable": 0, "frozen": 0})
        for param in child.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                part["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def describe_parameters(model: torch.nn.Module) -> str:
    """'backbone 5.80M + MIM decoder 0.90M + DINO head 5.00M = 11.70M trained; not trained: DINO head 4096
    (frozen), EMA teacher 6.10M (an EMA copy of backbone + head); exported: the 5.80M backbone'."""
    counts = {name: c for name, c in parameter_counts(model).items() if c["trainable"] + c["frozen"]}
    trained = [(name, c["trainable"]) for name, c in counts.items() if c["trainable"]]
    text = " + ".join(f"{PART_NAMES.get(n, n)} {_count(v)}" for n, v in trained)
    text += f" = {_count(sum(v for _, v in trained))} trained"
    frozen = [
        f"{PART_NAMES.get(n, n)} {_count(c['frozen'])} "
        + ("(an EMA copy of backbone + head)" if n == "teacher" else "(frozen)")
        for n, c in counts.items()
        if c["frozen"]
    ]
    if frozen:
        text += "; not trained: " + ", ".join(frozen)
    backbone = counts.get("backbone", {"trainable": 0, "frozen": 0})
    return text + f"; exported: the {_count(backbone['trainable'] + backbone['frozen'])} backbone"


def build_monitor(config: Config):
    if not config.data.val or config.train.knn_every <= 0:
        return None
    from ssl_hybrid.train.monitor import KNNMonitor

    return KNNMonitor(config)


def flat_hparams(config: Config) -> dict[str, Any]:
    from ssl_hybrid.logs import redact

    flat = ckpt._flatten(to_dict(config))
    unused = unused_settings(config)
    # Shard URLs may carry credentials (user:pass@, signed query strings); TensorBoard files get shared.
    return {
        k: redact(v) if isinstance(v, str) else v
        for k, v in flat.items()
        if isinstance(v, (int, float, str, bool)) and k not in unused
    }


def batches(run: Run) -> Generator[dict, None, None]:
    """The stream, moved to the device; fails clearly if the stream ends before the step budget."""
    for batch in run.stream:
        yield to_device(batch, run.accelerator.device)
    raise UserError(f"{run.config.data.train}: the data stream ended at step {run.counters.step}")


def should_stop(run: Run, stop: StopSignal, started: float) -> str | None:
    budget = run.config.train.max_seconds
    over_time = budget > 0 and time.monotonic() - started >= budget
    signal_flag, time_flag = sync_flags(run.accelerator, 1.0 if stop.received else 0.0, 1.0 if over_time else 0.0)
    if signal_flag:
        return "signal"
    if time_flag:
        return "max_seconds"
    return None


def signalled(run: Run, stop: StopSignal) -> bool:
    """Whether any process got SIGTERM/SIGINT (all ranks agree, so they all take the same branch)."""
    return sync_flags(run.accelerator, 1.0 if stop.received else 0.0)[0] > 0


def train(run: Run, stop: StopSignal) -> None:
    config, counters = run.config, run.counters
    every = config.train.checkpoint_every
    started = time.monotonic()
    # A signal during setup or the step-0 monitor stops before the first step (nothing new to save).
    if signalled(run, stop):
        run.stop_reason = "signal"
        return
    if config.train.knn_every > 0 and counters.step == 0:
        run_monitor(run)
        if signalled(run, stop):
            run.stop_reason = "signal"
            return
    bar = make_bar(run)
    window_images, window_start = 0, time.perf_counter()
    run.model.train()
    with contextlib.closing(batches(run)) as source:
        try:
            while counters.step < config.train.steps:
                batch = next(source)
                values = train_step(run, batch, counters.step)
                images = len(batch["global_views"][0]) * run.accelerator.num_processes
                if not handle_nonfinite(run, values):
                    continue
                counters.step += 1
                counters.images += images
                if counters.step == run.start_step + 1:
                    run.startup_seconds = time.monotonic() - started
                window_images += images
                if bar is not None:
                    bar.update(1)
                if counters.step % config.train.log_every == 0 or counters.step == config.train.steps:
                    log_step(run, values, time.perf_counter() - window_start, window_images, bar)
                    window_images, window_start = 0, time.perf_counter()
                run.stop_reason = should_stop(run, stop, started)
                if run.stop_reason == "signal":
                    break  # straight to the checkpoint: the launcher kills soon (torchrun: 30 s after its SIGTERM)
                paused = time.perf_counter()  # monitor and checkpoint time is not training throughput
                if config.train.knn_every > 0 and counters.step % config.train.knn_every == 0:
                    run_monitor(run)
                if every > 0 and counters.step % every == 0 and counters.step < config.train.steps:
                    save(run)
                window_start += time.perf_counter() - paused
                if run.stop_reason:
                    break
        finally:
            run.train_seconds = time.monotonic() - started
            source.close()
            if bar is not None:
                bar.close()


def handle_nonfinite(run: Run, values: dict[str, float]) -> bool:
    """True when the step counted; raises after max_nonfinite_steps skipped steps in a row."""
    counters = run.counters
    if "nonfinite" not in values:
        counters.nonfinite_in_row = 0
        return True
    counters.nonfinite_total += 1
    if values.get("fp16_overflow"):  # the grad scaler's own back-off (scaler_overflow), not a diverging run
        log.info(
            "step %d: fp16 gradient overflow, step skipped and the loss scale lowered (%d skipped in total)",
            counters.step,
            counters.nonfinite_total,
        )
        return False
    counters.nonfinite_in_row += 1
    what = "loss" if values.get("nonfinite_loss") else "gradient norm"
    log.warning(
        "step %d: non-finite %s, step skipped (%d in a row, %d in total)",
        counters.step,
        what,
        counters.nonfinite_in_row,
        counters.nonfinite_total,
    )
    if counters.nonfinite_in_row >= run.config.train.max_nonfinite_steps:
        newest = ckpt.latest_checkpoint(run.directory)
        raise NonFiniteLossError(
            f"{counters.nonfinite_in_row} non-finite steps (loss or gradient norm) in a row at step {counters.step} "
            f"(train.max_nonfinite_steps={run.config.train.max_nonfinite_steps}); lower optim.lr or use "
            f"mixed_precision=bf16 instead of fp16. Last good checkpoint: {newest or 'none'}"
        )
    return False


def autocast_dtype(accelerator) -> torch.dtype:
    """The dtype ``accelerator.autocast()`` runs matmuls and convolutions in (float32 when it is off)."""
    device = accelerator.device.type
    with accelerator.autocast():
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32


def log_precision(accelerator) -> None:
    log.info(
        "mixed precision '%s': autocast runs matmuls/convolutions in %s, normalization/softmax/losses in float32",
        accelerator.mixed_precision,
        autocast_dtype(accelerator),
    )


def make_bar(run: Run):
    if not run.accelerator.is_main_process:
        return None
    from ssl_hybrid.train.progress import TrainBar

    return TrainBar(
        total=run.config.train.steps,
        initial=run.counters.step,
        desc=run.config.name,
        unit="step",
        dynamic_ncols=True,
        budget_seconds=run.config.train.max_seconds,
    )


def finish(run: Run, stop: StopSignal) -> dict[str, Any]:
    """Final checkpoint, export and final monitor, each skipped once a signal asked to stop (re-running the
    same command does what was skipped); a session that trained no step has nothing new to save."""
    interrupted = run.stop_reason == "signal"
    if not interrupted or run.counters.step > run.start_step:
        save(run)
    exported = None
    budget = budget_record(run)
    interrupted = interrupted or signalled(run, stop)  # e.g. a SIGTERM during the final checkpoint
    if not interrupted:
        exported = export_backbone(run, budget)
        if (
            run.config.train.knn_every > 0
            and run.counters.step % run.config.train.knn_every != 0
            and not signalled(run, stop)
        ):
            run_monitor(run)
    summary = {
        "run_dir": str(run.directory),
        "step": run.counters.step,
        **budget,
        "nonfinite_total": run.counters.nonfinite_total,
        "backbone": str(exported) if exported else None,
    }
    if interrupted:
        nothing = " before training a step (nothing new to save)" if run.counters.step == run.start_step else ""
        log.warning("stopped by signal at step %d%s; re-run the same command to resume", run.counters.step, nothing)
    return summary


def budget_record(run: Run) -> dict[str, Any]:
    """The budget and what was used of it: steps planned, max_seconds (0 = none), why training stopped,
    and the training time of the session that trained from ``start_step`` (a resumed run trained before
    that too). A session that trained nothing (re-run of a finished run) keeps the exported record."""
    if run.counters.step == run.start_step:
        previous = exported_record(run.directory)
        if previous and previous.get("steps") == run.config.train.steps:
            return previous
    return {
        "steps": run.config.train.steps,
        "max_seconds": run.config.train.max_seconds,
        "stopped": run.stop_reason or "done",
        "start_step": run.start_step,
        "train_seconds": round(run.train_seconds, 1),
        "startup_seconds": round(run.startup_seconds, 1),
    }


def exported_record(directory: Path) -> dict[str, Any] | None:
    """The budget record of the run's export; None when it has not been exported yet."""
    from ssl_hybrid.models.export import (
        RECORD_KEY,
        BackboneLoadError,
        read_model_config,
    )
    from ssl_hybrid.train.export import MODEL_DIR

    try:
        return (read_model_config(directory / MODEL_DIR).get(RECORD_KEY) or {}).get("pretraining")
    except BackboneLoadError:  # not exported yet (or the export is unreadable): a new record is written
        return None


def export_backbone(run: Run, budget: dict[str, Any]) -> Path | None:
    """The run's model folder ``<run>/model/``; the run owns it, so a finished re-run replaces it (atomically)."""
    from ssl_hybrid.train.export import MODEL_DIR, save_run_model

    run.accelerator.wait_for_everyone()
    folder, failure = None, None
    if run.accelerator.is_main_process:
        try:
            folder = save_run_model(
                run.raw_model.backbone,
                run.config,
                run.directory / MODEL_DIR,
                {"step": run.counters.step, "pretraining": budget},
                force=True,
                run_dir=run.directory,
            )
            log.info("exported %s", folder)
        except Exception as err:  # a full disk, a record that cannot be written: one line; every rank stops here,
            # none waits at a later collective
            failure = (
                err
                if isinstance(err, UserError)
                else UserError(f"{run.directory / MODEL_DIR}: the export failed ({type(err).__name__}: {err})")
            )
    # The flag's all-reduce is also the barrier after which every rank may read the export (quickstart's
    # evaluation runs on every rank).
    if sync_flags(run.accelerator, float(failure is not None))[0]:
        raise failure or UserError("the export failed on the main process (its error is in its log)")
    return run.directory / MODEL_DIR


def pretrain(config: Config, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) the pretraining job described by ``config``; returns a summary dict. ``fresh`` deletes
    the run folder first (``runs.start_fresh``: a run folder only, after the model and data were built)."""
    run: Run | None = None
    held = contextlib.ExitStack()  # the run folder's lock, held until the job ends
    # A process group that exists already is its creator's to end (quickstart keeps one for its evaluation):
    # destroying and re-creating one over the launcher's store can hang (gloo reconnects to stale addresses).
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    # Signals are taken over for the whole job, setup and export included: a launcher's SIGTERM ends the job
    # at the next safe point (after setup, after the current step, before the export) with exit 0.
    with StopSignal() as stop, held:
        try:
            run = setup(config, fresh, held)
            if run.counters.step < config.train.steps:
                train(run, stop)
            return finish(run, stop)
        finally:
            from ssl_hybrid.distributed import end_distributed

            accelerator = run.accelerator if run is not None else None
            run = None  # it holds the DDP-wrapped model, which keeps the process group alive past its destruction
            end_distributed(accelerator, destroy_group=owns_group)
            # Accelerate keeps one process-wide state; clear it so a later job in this process (benchmarks,
            # notebooks, tests) may pick another mixed precision (Accelerate's own tests do the same).
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
