"""The pretraining loop (``train``), read top to bottom, and the job around it (``pretrain``: build with
``train.wiring``, train, finish), MAE-style: the math is in ``ssl_hybrid.objectives``.

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
import math
import time
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ssl_hybrid import rng, runs
from ssl_hybrid.config import Config
from ssl_hybrid.data.augment import augment_generator
from ssl_hybrid.device import sync_flags
from ssl_hybrid.errors import UserError
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train.export import budget_record, export_backbone
from ssl_hybrid.train.optim import apply_schedule
from ssl_hybrid.train.signals import StopSignal
from ssl_hybrid.train.state import Run, save

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ssl_hybrid.train.progress import TrainBar

log = logging.getLogger(__name__)

# embedding_std is ~1 for spread-out embeddings and 0 when every image maps to the same vector.
COLLAPSE_STD = 0.05


class NonFiniteLossError(UserError):
    """Too many non-finite losses in a row."""


def train(run: Run, stop: StopSignal) -> None:
    """Optimizer steps from ``run.counters.step`` to ``settings.steps``; a skipped (non-finite) step is retried
    with the next batch under the same step number, so schedules and checkpoints only see good steps."""
    settings, counters, accelerator = run.settings, run.counters, run.accelerator
    started = time.monotonic()
    # A signal during setup or the step-0 monitor stops before the first step (nothing new to save).
    if signalled(run, stop):
        run.stop_reason = "signal"
        return
    if settings.knn_every > 0 and counters.step == 0:
        run_monitor(run)
        if signalled(run, stop):
            run.stop_reason = "signal"
            return
    bar = make_bar(run)
    window_images, window_start = 0, time.perf_counter()
    run.model.train()
    with contextlib.closing(batches(run)) as source:
        try:
            while counters.step < settings.steps:
                step, batch = counters.step, next(source)

                # data.augment_on=device: the photometric augmentations, batched on the device; their draws are a
                # function of (seed, step, rank), so a resumed run repeats them exactly.
                if run.augment is not None:
                    batch = run.augment(batch, augment_generator(settings.seed, step, accelerator.process_index))

                # Schedules: the optimizer's lr and weight decay of this step.
                apply_schedule(
                    run.optimizer, float(run.schedules["lr"][step]), float(run.schedules["weight_decay"][step])
                )

                # Forward/backward over the micro-batches. Masks are drawn for the rank's whole batch first, so
                # accumulation changes nothing; only the last micro-batch all-reduces gradients (DDP no_sync).
                micros = split_micro(add_masks(run, batch, step), settings.grad_accum_steps)
                # A forward updates BatchNorm running statistics before its loss is known: a skipped step restores them.
                buffers = [(buffer, buffer.detach().clone()) for buffer in run.raw_model.buffers()]
                terms: dict[str, float] = {}
                stats: dict[str, float] = {}
                loss_finite = True
                for index, micro in enumerate(micros):
                    last = index == len(micros) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
                        losses, step_stats = forward_losses(run, micro, step)
                        # Every rank runs every backward (no rank-local break, so DDP's gradient all-reduce never
                        # waits for a rank that stopped); a non-finite loss is agreed on below, with the grad norm.
                        loss_finite = loss_finite and bool(torch.isfinite(losses["loss"].detach()).all())
                        accelerator.backward(losses["loss"] / len(micros))
                    for key, value in losses.items():
                        terms[key] = terms.get(key, 0.0) + float(value.detach()) / len(micros)
                    stats = {key: float(value) for key, value in step_stats.items()}
                grad_norm = clip_gradients(run.model, accelerator, settings.clip_grad)
                # One all-reduce per step: the non-finite flags (any rank) and the loss terms (mean over ranks).
                bad_loss, bad_grad, means = reduce_step(
                    accelerator, (not loss_finite, not math.isfinite(grad_norm)), {**terms, **stats}
                )

                # Non-finite check, before the step counts: a non-finite loss or gradient norm on any rank skips
                # the step on every rank (an fp16 overflow is an infinite gradient norm: the step the grad scaler
                # skips is skipped here too, never counted as a good one).
                if bad_loss or bad_grad:
                    skip_step(run, buffers)
                    values = {
                        "nonfinite": 1.0,
                        "nonfinite_loss": bad_loss,
                        "nonfinite_grad_norm": bad_grad,
                        "fp16_overflow": float(scaler_overflow(run, bool(bad_loss))),
                    }
                else:
                    # Step + EMA: the teacher follows the student only after a good step.
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                    run.raw_model.after_good_step(float(run.schedules["momentum"][step]))
                    values = {**means, "grad_norm": grad_norm}
                images = len(batch["global_views"][0]) * accelerator.num_processes
                if not handle_nonfinite(run, values):  # raises after max_nonfinite_steps in a row
                    continue
                counters.step += 1
                counters.images += images
                if counters.step == run.start_step + 1:
                    run.startup_seconds = time.monotonic() - started
                window_images += images
                if bar is not None:
                    bar.update(1)

                # Log: throughput over the window since the last log line, less monitor and checkpoint time.
                if counters.step % settings.log_every == 0 or counters.step == settings.steps:
                    log_step(run, values, time.perf_counter() - window_start, window_images, bar)
                    window_images, window_start = 0, time.perf_counter()

                # Stop? (every rank agrees). A signal goes straight to the checkpoint: the launcher kills soon
                # (torchrun: 30 s after its SIGTERM); a spent time budget still runs this step's monitor.
                run.stop_reason = should_stop(run, stop, started)
                if run.stop_reason == "signal":
                    break

                # Monitor and checkpoint (the final checkpoint is finish's); their time is not training throughput.
                paused = time.perf_counter()
                if settings.knn_every > 0 and counters.step % settings.knn_every == 0:
                    run_monitor(run)
                every = settings.checkpoint_every
                if every > 0 and counters.step % every == 0 and counters.step < settings.steps:
                    save(run)
                window_start += time.perf_counter() - paused

                # Stop after the checkpoint, for the time budget.
                if run.stop_reason:
                    break
        finally:
            run.train_seconds = time.monotonic() - started
            source.close()
            if bar is not None:
                bar.close()


# ---------------------------------------------------------------------------------------------
# What one step uses
# ---------------------------------------------------------------------------------------------


def batches(run: Run) -> Generator[dict, None, None]:
    """The stream, moved to the device; fails clearly if the stream ends before the step budget."""
    for batch in run.stream:
        yield to_device(batch, run.accelerator.device)
    raise UserError(f"{run.settings.data}: the data stream ended at step {run.counters.step}")


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        "global_views": [v.to(device, non_blocking=True) for v in batch["global_views"]],
        "local_views": [v.to(device, non_blocking=True) for v in batch["local_views"]],
        "key": batch.get("key", []),
    }


def mask_generator(seed: int, step: int, view: int, rank: int) -> torch.Generator:
    """Masks are a pure function of (seed, step, view, rank): nothing to checkpoint."""
    state = np.random.SeedSequence([seed, step, view, rank, 0x6D61736B]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def add_masks(run: Run, batch: dict, step: int) -> dict:
    """Masks for the rank's whole batch (before any micro-batch split, so accumulation changes nothing)."""
    if not run.raw_model.uses_masks:
        return dict(batch, masks=None)
    from ssl_hybrid.models.masking import random_grid_mask

    rank, settings = run.accelerator.process_index, run.settings
    masks = []
    for index, view in enumerate(batch["global_views"]):
        size, _, height, width = view.shape
        generator = mask_generator(settings.seed, step, index, rank)
        mask = random_grid_mask(size, height // 16, width // 16, settings.mask_ratio, generator)
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


def forward_losses(run: Run, micro: dict, step: int) -> tuple[dict, dict]:
    with run.accelerator.autocast():
        return run.model(
            micro["global_views"], micro["local_views"], micro["masks"], float(run.schedules["teacher_temp"][step])
        )


def clip_gradients(model: torch.nn.Module, accelerator: Accelerator, clip: float) -> float:
    """The total gradient norm (unscaled under fp16), after clipping to ``clip`` (optim.clip_grad) when it is > 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    if clip > 0:
        return float(accelerator.clip_grad_norm_(params, clip))
    accelerator.unscale_gradients()  # a no-op without an fp16 grad scaler
    grads = [p.grad.detach() for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def reduce_step(
    accelerator: Accelerator, flags: tuple[bool, ...], terms: dict[str, float]
) -> tuple[float, float, dict[str, float]]:
    """In one all-reduce (a sum): whether any rank raised each of the two flags (1.0/0.0), and each loss term's
    mean over ranks. Every rank computes the same terms in the same order (the model's loss dict)."""
    count = accelerator.num_processes
    values = torch.tensor([float(flag) for flag in flags] + list(terms.values()), dtype=torch.float64)
    if count > 1:
        values = values.to(accelerator.device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    reduced = values.tolist()
    bad_loss, bad_grad = (float(value > 0) for value in reduced[: len(flags)])
    means = reduced[len(flags) :] if count == 1 else [value / count for value in reduced[len(flags) :]]
    return bad_loss, bad_grad, dict(zip(terms, means))


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
    limit = run.settings.max_nonfinite_steps
    if counters.nonfinite_in_row >= limit:
        newest = ckpt.latest_checkpoint(run.directory)
        raise NonFiniteLossError(
            f"{counters.nonfinite_in_row} non-finite steps (loss or gradient norm) in a row at step {counters.step} "
            f"(train.max_nonfinite_steps={limit}); lower optim.lr or use "
            f"mixed_precision=bf16 instead of fp16. Last good checkpoint: {newest or 'none'}"
        )
    return False


# ---------------------------------------------------------------------------------------------
# Logging, monitoring, stopping
# ---------------------------------------------------------------------------------------------


def log_step(run: Run, values: dict[str, float], seconds: float, images: int, bar: TrainBar | None) -> None:
    step = run.counters.step
    record = {
        "step": step,
        **{name: float(run.schedules[name][step - 1]) for name in run.settings.logged_schedules},
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


def make_bar(run: Run) -> TrainBar | None:
    if not run.accelerator.is_main_process:
        return None
    from ssl_hybrid.train.progress import TrainBar

    return TrainBar(
        total=run.settings.steps,
        initial=run.counters.step,
        desc=run.settings.name,
        unit="step",
        dynamic_ncols=True,
        budget_seconds=run.settings.max_seconds,
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


def should_stop(run: Run, stop: StopSignal, started: float) -> str | None:
    budget = run.settings.max_seconds
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


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


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
        knn_every = run.settings.knn_every
        if knn_every > 0 and run.counters.step % knn_every != 0 and not signalled(run, stop):
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


def pretrain(config: Config, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) the pretraining job described by ``config``; returns a summary dict. ``fresh`` deletes
    the run folder first (``runs.start_fresh``: a run folder only, after the model and data were built)."""
    from ssl_hybrid.train.wiring import setup

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
            if run.counters.step < run.settings.steps:
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
