"""What each section of the GPU check measures (``benchmarks/gpu_check.py`` runs them, caps their time
and writes the results). Every section is ``section(plan, out)``: it fills the dict ``out`` as it goes,
so whatever it finished before a failure or its time cap is kept.

The measurements reuse the project's own code: ``benchmarks/bench_models.py`` for train-step throughput,
FLOP utilization, masking and layout/compile; ``ssl_hybrid.train.engine.pretrain`` for fp16 and the
GPU-length pretraining; ``ssl_hybrid.eval.features.extract_features`` and ``eval.report.build_report``
for feature extraction and the k-NN / k-shot comparison. Faults are injected from outside (monkeypatching
the loop's module functions), never through a switch in the production code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

log = logging.getLogger("gpu_check")

# Multiplies the loss of the injected step: finite in fp32 (so the loop's non-finite check lets it through),
# but its gradients overflow float16, which is what GradScaler exists to catch.
OVERFLOW_FACTOR = 1e30


def bench_args(plan, **changes: Any) -> argparse.Namespace:
    """The ``benchmarks/bench_models.py`` options of this plan (device, precision, sizes), with ``changes``."""
    return argparse.Namespace(**{**plan.bench, "device": plan.device, **changes})


# ---------------------------------------------------------------------------------------- 1. throughput

def throughput(plan, out: dict) -> None:
    """bf16 train step (fwd + CE + bwd + AdamW) per model, each timed in alternation with a bf16 GEMM."""
    from bench_models import bench_models

    out["rows"] = []
    for name in plan.models:
        out["rows"].extend(bench_models([name], bench_args(plan)))
        release_memory()


def masked(plan, out: dict) -> None:
    """Encoder train step with a 75% mask vs without, for each of our models."""
    from bench_models import bench_masked

    for name in plan.masked:
        out[name] = bench_masked(bench_args(plan, variant=name))
        release_memory()


def layout_compile(plan, out: dict) -> None:
    """Our model's train step: NCHW vs channels_last, then torch.compile on/off at the faster layout."""
    from bench_models import bench_compile, bench_layout

    args = bench_args(plan, variant=plan.variant)
    out["layout"] = bench_layout(args)
    release_memory()
    if plan.compile_note:
        out["compile_note"] = plan.compile_note
    out["compile"] = bench_compile(args, out["layout"]["faster"])
    out["faster"] = {"channels_last": out["layout"]["faster"] == "channels_last",
                     "compile": out["compile"]["faster"] == "compiled"}


# ---------------------------------------------------------------------------------------- 2. fp16 + GradScaler

def inject_overflow(forward_losses: Callable, at_step: int) -> Callable:
    """``engine.forward_losses`` whose loss at ``at_step`` is multiplied by OVERFLOW_FACTOR, once: the loop retries
    a skipped step with the next batch under the same step number, and that retry must be a normal step."""
    injected = []

    def wrapped(run, micro, step):
        losses, stats = forward_losses(run, micro, step)
        if step == at_step and not injected:
            injected.append(step)
            log.info("step %d: loss x %g injected (fp16 gradients will overflow)", step, OVERFLOW_FACTOR)
            losses = dict(losses, loss=losses["loss"] * OVERFLOW_FACTOR)
        return losses, stats
    return wrapped


def watch_scaler(add_masks: Callable, handle_nonfinite: Callable, records: list[dict]) -> tuple[Callable, Callable]:
    """``engine.add_masks`` (called as each step starts) and ``engine.handle_nonfinite`` (called once the step was
    taken or skipped) that record, per step, the loss scale before/after, whether the scaler skipped the optimizer
    step and whether any weight changed."""
    start: dict = {}

    def started(run, batch, step):
        params = [p for p in run.raw_model.parameters() if p.requires_grad]
        start.update(step=step, params=params, before=[p.detach().clone() for p in params],
                     scale=float(run.accelerator.scaler.get_scale()))
        return add_masks(run, batch, step)

    def ended(run, values):
        records.append(dict(step=start["step"], loss=values.get("loss"), loop_skipped="nonfinite" in values,
                            scale_before=start["scale"], scale_after=float(run.accelerator.scaler.get_scale()),
                            # the loop skips an overflowed step itself (no optimizer.step(), scaler.update() backs
                            # off); Accelerate's flag covers a step the scaler skipped inside optimizer.step()
                            scaler_skipped="nonfinite" in values or bool(run.optimizer.step_was_skipped),
                            params_changed=any(not torch.equal(a, p.detach())
                                               for a, p in zip(start["before"], start["params"]))))
        return handle_nonfinite(run, values)
    return started, ended


def cpu_grad_scaler(build_accelerator: Callable) -> Callable:
    """Accelerate makes no GradScaler on CPUs; hand it torch's CPU one, so the CPU smoke run takes the same
    scale -> unscale -> skip -> update path as a GPU."""
    def wrapped(config, directory):
        accelerator = build_accelerator(config, directory)
        if accelerator.scaler is None:
            accelerator.scaler = torch.amp.GradScaler("cpu")
            accelerator.native_amp = True  # Accelerator.autocast() then autocasts to float16 on the CPU
        return accelerator
    return wrapped


def fp16_overflow(plan, out: dict) -> None:
    """The default recipe in fp16 with GradScaler; one step's loss overflows on purpose."""
    from ssl_hybrid.train import engine, wiring

    s = plan.fp16
    config = recipe_config(plan, "gpu_check_fp16", image_size=s["image_size"], batch_size=s["batch_size"],
                           steps=s["steps"], mixed_precision="fp16", log_every=1, model=s["model"])
    records: list[dict] = []
    out.update(model=s["model"], image_size=s["image_size"], batch_size=s["batch_size"], steps=s["steps"],
               injected_step=s["inject_step"], overflow_factor=OVERFLOW_FACTOR, records=records)
    started, ended = watch_scaler(engine.add_masks, engine.handle_nonfinite, records)
    patches = [mock.patch.object(engine, "forward_losses", inject_overflow(engine.forward_losses, s["inject_step"])),
               mock.patch.object(engine, "add_masks", started), mock.patch.object(engine, "handle_nonfinite", ended)]
    if torch.device(plan.device).type == "cpu":
        patches.append(mock.patch.object(wiring, "build_accelerator", cpu_grad_scaler(wiring.build_accelerator)))
        out["scaler_note"] = "CPU: torch.amp.GradScaler('cpu') handed to Accelerate (it makes none on CPUs)"
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        summary = engine.pretrain(config)
    out.update(summarize_overflow(records, s["inject_step"]), steps_done=summary["step"],
               loop_nonfinite_total=summary["nonfinite_total"],
               note="a step the scaler skips is not a good step: the loop counts it in nonfinite_total (not towards "
                    "train.max_nonfinite_steps while the loss scale backs off) and retries the step number with the "
                    "next batch, so its lr and EMA schedule do not advance")
    shutil.rmtree(summary["run_dir"], ignore_errors=True)


def summarize_overflow(records: list[dict], injected: int) -> dict[str, Any]:
    at = next((r for r in records if r["step"] == injected), None)
    after = [r for r in records if r["step"] > injected]
    last_loss = records[-1]["loss"] if records else None
    return dict(
        scaler_skipped_steps=[r["step"] for r in records if r["scaler_skipped"]],
        injected_step_skipped=bool(at and at["scaler_skipped"] and not at["params_changed"]),
        scale_at_injection=[at["scale_before"], at["scale_after"]] if at else None,
        steps_after_injection=len(after),
        updated_after_injection=sum(not r["scaler_skipped"] and r["params_changed"] for r in after),
        final_loss=last_loss,
        recovered=bool(after and not after[-1]["scaler_skipped"] and after[-1]["params_changed"]
                       and last_loss is not None and math.isfinite(last_loss)))


# ---------------------------------------------------------------------------------------- 3. pretraining

def recipe_config(plan, name: str, *, image_size: int, batch_size: int, steps: int, mixed_precision: str,
                  log_every: int, max_seconds: float = 0.0, model: str = "", data: str = ""):
    """The default recipe (recipes/quickstart.yaml) with this check's size, precision and budget."""
    from ssl_hybrid.config import load_config
    from ssl_hybrid.quickstart import QUICKSTART_RECIPE

    overrides = [f"name={name}", f"train.output_dir={plan.work_dir / 'runs'}", "data.val=",
                 f"data.image_size={image_size}", f"data.local_image_size={image_size // 2}",
                 f"data.num_workers={plan.workers}",
                 f"train.batch_size={batch_size}", f"train.steps={steps}", f"train.max_seconds={max_seconds}",
                 "train.knn_every=0", "train.checkpoint_every=0", f"train.log_every={log_every}"]
    # "no" is the default; as an override it would parse as YAML's boolean false and be refused.
    overrides += [f"train.mixed_precision={mixed_precision}"] if mixed_precision != "no" else []
    overrides += [f"model.name={model}"] if model else []
    overrides += [f"data.train={data}"] if data else []
    return load_config(QUICKSTART_RECIPE, overrides)


def labeled_sets(plan, directory: Path):
    """(pretraining spec, train set, test set): flowers12's train/ and test/ folders, or the embedded corpus
    with the quickstart's seeded per-class split (pretraining then reads all of it, labels unused)."""
    from ssl_hybrid.data.labeled import align_classes, load_labeled
    from ssl_hybrid.quickstart import split_corpus

    data = Path(plan.data)
    if (data / "train").is_dir() and (data / "test").is_dir():
        train = load_labeled(data / "train")
        spec, train, test = str(data / "train"), train, align_classes(train, load_labeled(data / "test"))
    else:
        spec, (train, test) = str(data), split_corpus(str(data), 0, directory)
    return spec, first_classes(train, plan.pretrain.get("eval_classes")), first_classes(test, plan.pretrain.get("eval_classes"))


def first_classes(labeled, count):
    """The samples of the first ``count`` classes (all when ``count`` is None): a smaller evaluation."""
    if not count:
        return labeled
    return labeled.subset([i for i, sample in enumerate(labeled.samples) if sample.label < count])


def steady_img_per_s(run_dir: Path) -> float:
    """Median img/s of the logged windows after the first (start-up and warm-up land in the first)."""
    from ssl_hybrid.runs import read_metrics

    rates = [r["img_per_s"] for r in read_metrics(run_dir) if "img_per_s" in r]
    return statistics.median(rates[1:] or rates)


def pretrain(plan, out: dict) -> None:
    """Default recipe for ``seconds`` of training at GPU size, then k-NN + k-shot vs the same model at random
    init. The schedule needs a step count: a short calibration run measures img/s first."""
    from ssl_hybrid.eval.report import build_report
    from ssl_hybrid.train.engine import pretrain as run_pretrain

    s = plan.pretrain
    report_dir = plan.out_dir / "pretrain_report"
    spec, train_set, test_set = labeled_sets(plan, plan.work_dir)
    precision = "bf16" if torch.device(plan.device).type == "cuda" else "no"
    size = dict(image_size=s["image_size"], batch_size=s["batch_size"], mixed_precision=precision, data=spec,
                model=s.get("model", ""))  # the recipe's model unless the plan names another
    out.update(data=spec, train_images=len(train_set), test_images=len(test_set), classes=len(train_set.classes),
               precision=precision, image_size=s["image_size"], batch_size=s["batch_size"], seconds=s["seconds"])
    calibration = run_pretrain(recipe_config(plan, "gpu_check_calibrate", steps=s["calibration_steps"],
                                             log_every=s["log_every"], **size))
    rate = steady_img_per_s(Path(calibration["run_dir"]))
    steps = max(1, int(s["seconds"] * rate / s["batch_size"]))
    out.update(calibration_img_per_s=round(rate, 1), planned_steps=steps)
    log.info("calibration: %.1f img/s -> %d steps in %.0f s", rate, steps, s["seconds"])
    config = recipe_config(plan, "gpu_check_pretrain", steps=steps, log_every=s["log_every"],
                           max_seconds=s["seconds"], **size)
    summary = run_pretrain(config)
    out.update(steps_done=summary["step"], stopped=summary["stopped"], model=config.model.name,
               img_per_s=round(steady_img_per_s(Path(summary["run_dir"])), 1))
    report = build_report([summary["run_dir"], f"random:{config.model.name}"], train_set, test_set, report_dir,
                          names=[f"{config.model.name} pretrained ({summary['step']} steps)",
                                 f"{config.model.name} random init"],
                          shots=s["shots"], seeds=s["seeds"], methods=("linear",), image_size=s["image_size"],
                          batch_size=s["batch_size"], num_workers=plan.workers, cache_dir=None)
    out["report"] = str(report_dir / "report.md")
    out["entries"] = [entry_summary(e) for e in report["entries"]]
    pretrained, random = out["entries"]
    out["gain"] = {key: round(pretrained[key] - random[key], 1) for key in pretrained
                   if key != "name" and not key.endswith("_std")}  # percentage points, pretrained - random


def entry_summary(entry: dict) -> dict[str, Any]:
    """k-NN top-1/top-5 and k-shot linear means (%) of one report entry."""
    row = {"name": entry["name"], "knn_top1": round(100 * entry["knn"]["top1"], 1),
           "knn_top5": round(100 * entry["knn"]["top5"], 1)}
    for r in entry["fewshot"]:
        row[f"{r['shots']}shot"] = round(100 * r["mean"], 1)
        row[f"{r['shots']}shot_std"] = round(100 * r["std"], 1)
    return row


# ---------------------------------------------------------------------------------------- 4. features

def features(plan, out: dict) -> None:
    """``extract_features`` (multi-scale pooling) under CUDA autocast vs a bare forward, in alternation,
    on in-memory images (decoding is the data section's business); the two feature sets are compared too."""
    for name in plan.features["models"]:
        out[name] = extraction_speed(plan, name)
        release_memory()


def extraction_speed(plan, name: str) -> dict[str, Any]:
    from timing import time_alternating

    from ssl_hybrid.eval import features as feats
    from ssl_hybrid.models.factory import create_backbone

    s = plan.features
    model = create_backbone(name, s["image_size"]).to(plan.device)
    forward = feats.pooling_forward(model, "multiscale")
    images = torch.randn(s["images"], 3, s["image_size"], s["image_size"])
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(s["images"], dtype=torch.long),
                                             torch.arange(s["images"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=s["batch_size"],
                                         pin_memory=torch.device(plan.device).type == "cuda")
    outputs: dict[str, Any] = {}

    def extract(side: str) -> Callable[[], None]:
        bare = mock.patch.object(feats, "autocast_context", lambda device: contextlib.nullcontext())
        def run() -> None:
            with bare if side == "bare" else contextlib.nullcontext():
                outputs[side] = feats.extract_features(model, loader, forward=forward)[0]
        return run

    times = time_alternating({side: extract(side) for side in ("autocast", "bare")}, s["iters"], s["warmup"])
    seconds = {side: statistics.median(t["wall"]) for side, t in times.items()}
    a, b = (torch.nn.functional.normalize(torch.from_numpy(outputs[side]), dim=1) for side in ("autocast", "bare"))
    context = feats.autocast_context(torch.device(plan.device))
    return dict(images=s["images"], batch_size=s["batch_size"], image_size=s["image_size"],
                autocast_dtype=str(getattr(context, "fast_dtype", "none (fp32)")),
                img_per_s={side: round(s["images"] / t, 1) for side, t in seconds.items()},
                autocast_speedup=round(seconds["bare"] / seconds["autocast"], 3),
                min_cosine_autocast_vs_bare=round(float((a * b).sum(1).min()), 5),
                times_s={side: [round(x, 4) for x in t["wall"]] for side, t in times.items()})


# ---------------------------------------------------------------------------------------- 6. augmentation

def augment_sides(plan) -> dict[str, Callable[[], Any]]:
    """``data.augment_on=device``: each recipe's batched photometric ops on a uint8 batch already on the device
    (what the trainer runs per step), at the bench's image size and batch; C=5 with the per-channel recipe."""
    from types import SimpleNamespace

    from timing import synchronized

    from ssl_hybrid.data.augment import augment_generator, build_batch_augment

    size, batch = plan.bench["img_size"], plan.bench["batch_size"]
    recipes = {
        "simclr": (dict(views="simclr", num_local_views=0), 3),
        "dino_multicrop": (dict(views="dino", num_local_views=plan.augment["local_views"]), 3),
        "simclr_5ch": (dict(views="simclr", num_local_views=0), 5),
    }
    sides = {}
    for name, (recipe, channels) in recipes.items():
        cfg = SimpleNamespace(image_size=size, local_image_size=max(8, size * 3 // 7), simclr_min_scale=0.08,
                              simclr_local_min_scale=0.05, simclr_blur=0.5, simclr_color_jitter=1.0, simclr_hue=0.2,
                              simclr_grayscale=0.2, **recipe)
        stats = ([0.5] * channels, [0.25] * channels) if channels != 3 else (None, None)
        _, augment = build_batch_augment(cfg, channels, *stats)
        g = torch.Generator(device=plan.device).manual_seed(channels)
        views = {key: [torch.randint(0, 256, (batch, channels, r.size, r.size), generator=g, device=plan.device,
                                     dtype=torch.uint8) for r in recipes_]
                 for key, recipes_ in (("global_views", augment.global_recipes),
                                       ("local_views", augment.local_recipes))}
        sides[name] = synchronized(lambda a=augment, v=views: a(v, augment_generator(0, 0, 0)), plan.device)
    return sides


def augment(plan, out: dict) -> None:
    """Batched augmentation of a whole batch (all its views) vs the bf16 train step of ``plan.variant`` on one
    view of the same batch, timed in alternation: the goal is augmentation never slower than the step."""
    from bench_models import _adamw, _classifier, _inputs, _train_step_fn, autocast_for
    from timing import rounded, significant, synchronized, time_alternating

    args = bench_args(plan)
    model = _classifier(plan.variant, args)
    x, labels = _inputs(args)
    sides = {"train_step": synchronized(_train_step_fn(model, x, labels, _adamw(model),
                                                       autocast_for(args.device, args.precision)), args.device)}
    sides.update(augment_sides(plan))
    times = time_alternating(sides, args.iters, args.warmup)
    step_s = statistics.median(times["train_step"]["wall"])
    out.update(model=plan.variant, img_size=args.img_size, batch_size=args.batch_size, precision=args.precision,
               step_img_per_s=significant(args.batch_size / step_s, 4), recipes={})
    for name in sides:
        if name == "train_step":
            continue
        seconds = statistics.median(times[name]["wall"])
        out["recipes"][name] = dict(img_per_s=significant(args.batch_size / seconds, 4),
                                    step_over_augment=significant(step_s / seconds), times_s=rounded(times[name]))
    out["slowest_step_over_augment"] = min(r["step_over_augment"] for r in out["recipes"].values())
    out["goal_met"] = out["slowest_step_over_augment"] >= 1.0
    del model
    release_memory()


def release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SECTIONS: dict[str, Callable[[Any, dict], None]] = {
    "throughput": throughput, "augment": augment, "masked": masked, "fp16_overflow": fp16_overflow,
    "features": features, "pretrain": pretrain, "layout_compile": layout_compile}
