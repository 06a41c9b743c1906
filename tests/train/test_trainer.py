"""Trainer behaviour in-process on a tiny real configuration: schedules, optimizer groups, fault
handling, checkpoint rotation and refusal, wall-clock budget, metrics/TensorBoard/k-NN monitor, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.utils.scheduler import cosine_schedule
from safetensors.torch import load_file

from ssl_hybrid import device, runs
from ssl_hybrid.config import load_config
from ssl_hybrid.schedules import cosine, warmup_cosine
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train import engine, params, state, wiring
from ssl_hybrid.train.optim import apply_schedule, build_optimizer, no_decay_names
from ssl_hybrid.train.schedules import build_schedules
from ssl_hybrid.train.settings import LoopSettings
from tests.train.trainhelpers import tiny_overrides


def tiny_config(run_root, name="tiny", **extra):
    return load_config(None, tiny_overrides(run_root, name, **extra))


# ------------------------------------------------------------------------------------- schedules

def test_schedules_match_lightly_cosine_and_dino_warmups(tmp_path):
    np.testing.assert_allclose(cosine(0.996, 1.0, 50), [cosine_schedule(s, 50, 0.996, 1.0) for s in range(50)])
    lr = warmup_cosine(1.0, 0.1, total=20, warmup=5)
    np.testing.assert_allclose(lr[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(lr[5:], [cosine_schedule(s, 15, 1.0, 0.1) for s in range(15)])
    config = load_config(None, ["train.steps=100", "train.batch_size=512", "optim.lr=1e-3",
                                "objective.warmup_teacher_temp_steps=30"])
    values = build_schedules(config)
    assert {k: len(v) for k, v in values.items()} == dict.fromkeys(values, 100)
    assert values["lr"].max() == pytest.approx(2e-3)  # linear scaling: lr * 512 / 256
    assert values["momentum"][0] == pytest.approx(0.996) and values["momentum"][-1] == 1.0
    assert values["teacher_temp"][0] == pytest.approx(0.04) and values["teacher_temp"][29] == pytest.approx(0.07)
    assert values["weight_decay"][0] == pytest.approx(0.04) and values["weight_decay"][-1] == pytest.approx(0.4)


def test_weight_decay_skips_norms_biases_and_tokens(run_root):
    config = tiny_config(run_root)
    from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

    model = PretrainModel(wiring.build_backbone(config), ObjectiveSettings.from_config(config))
    skip = no_decay_names(model)
    assert {"backbone.pos_embed", "backbone.cls_token", "mim.decoder.mask_token", "backbone.norm.weight",
            "backbone.patch_embed.bias"} <= skip
    assert "backbone.patch_embed.weight" not in skip and "dino.head.layers.0.weight" not in skip
    optimizer = build_optimizer(model, config.optim)
    apply_schedule(optimizer, lr=0.1, weight_decay=0.05)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 0.1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


@pytest.mark.parametrize("model_name", ["resvit_nano", "hybrid_nano"])
def test_decay_groups_are_timms_plus_the_heads_tokens(run_root, model_name):
    from timm.optim import param_groups_weight_decay

    from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

    config = tiny_config(run_root, model__name=model_name)
    model = PretrainModel(wiring.build_backbone(config), ObjectiveSettings.from_config(config))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # the rule of before, spelled out: 1-D, declared by the backbone, or a token / position table by name
    declared = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
    expected = {name for name, p in trainable.items() if p.ndim <= 1 or name in declared
                or any(part in name.rsplit(".", 1)[-1] for part in ("token", "pos_embed", "position", "rel_pos"))}
    assert no_decay_names(model) == expected
    # on the backbone alone, timm's own grouping (its no_weight_decay list) says the same
    backbone = model.backbone
    timm_no_decay = {id(p) for g in param_groups_weight_decay(backbone, 0.05, no_weight_decay_list=backbone.no_weight_decay())
                     if g["weight_decay"] == 0 for p in g["params"]}
    assert {f"backbone.{n}" for n, p in backbone.named_parameters() if id(p) in timm_no_decay} == \
        {n for n in expected if n.startswith("backbone.")}
    # the optimizer's groups carry exactly that split
    optimizer = build_optimizer(model, config.optim)
    undecayed = {id(p) for g in optimizer.param_groups if not g["apply_wd"] for p in g["params"]}
    assert undecayed == {id(trainable[n]) for n in expected}


def test_transformer_lr_scale_applies_to_the_vit_part_only(run_root):
    config = tiny_config(run_root, model__name="resvit_nano", optim__transformer_lr_scale=0.25)
    from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

    model = PretrainModel(wiring.build_backbone(config), ObjectiveSettings.from_config(config))
    optimizer = build_optimizer(model, config.optim)
    apply_schedule(optimizer, lr=0.1, weight_decay=0.05)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert lr_of[id(names["backbone.blocks.0.attn.qkv.weight"])] == pytest.approx(0.025)
    assert lr_of[id(names["backbone.cls_token"])] == pytest.approx(0.025)
    assert wd_of[id(names["backbone.cls_token"])] == 0.0 and wd_of[id(names["backbone.blocks.0.attn.qkv.weight"])] == 0.05
    assert lr_of[id(names["backbone.stages.0.0.conv1.weight"])] == 0.1 and lr_of[id(names["dino.head.layers.0.weight"])] == 0.1
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("model_name", ["resvit_nano", "hybrid_nano"])
def test_layer_decay_scales_lr_by_depth_from_the_top(run_root, model_name):
    config = tiny_config(run_root, model__name=model_name, optim__layer_decay=0.5, optim__transformer_lr_scale=0.25)
    from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

    model = PretrainModel(wiring.build_backbone(config), ObjectiveSettings.from_config(config))
    optimizer = build_optimizer(model, config.optim)
    apply_schedule(optimizer, lr=1.0, weight_decay=0.05)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr = {name: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}
    depth = len(model.backbone.blocks)
    # the heads sit above the backbone's top layer: full lr; each block below the top halves it
    assert lr["dino.head.layers.0.weight"] == 1.0 and lr["mim.decoder.embed.weight"] == 1.0
    top, first = lr[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"], lr["backbone.blocks.0.mlp.fc1.weight"]
    assert top == pytest.approx(0.25 * 0.5) and first == pytest.approx(top * 0.5 ** (depth - 1))
    assert lr["backbone.norm.weight"] == pytest.approx(0.5)  # in the top block's layer; not a transformer parameter
    assert len(lr_of) == len(lr)  # every trainable parameter in exactly one group


def test_layer_decay_off_keeps_the_groups_of_before(run_root):
    config = tiny_config(run_root, model__name="resvit_nano")
    from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

    model = PretrainModel(wiring.build_backbone(config), ObjectiveSettings.from_config(config))
    assert config.optim.layer_decay == 1.0
    assert [g["lr_scale"] for g in build_optimizer(model, config.optim).param_groups] == [1.0, 1.0]


def test_parameter_count_says_what_it_counts(run_root):
    from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

    model = PretrainModel(wiring.build_backbone(tiny_config(run_root)), ObjectiveSettings.from_config(tiny_config(run_root)))
    counts = params.parameter_counts(model)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert counts["backbone"] == {"trainable": backbone, "frozen": 0}
    assert counts["teacher"]["trainable"] == 0 and counts["teacher"]["frozen"] > backbone  # backbone + DINO head
    assert sum(c["trainable"] for c in counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = params.describe_parameters(model)
    assert text.startswith(f"backbone {backbone / 1e6:.2f}M + MIM decoder ") and "DINO head" in text
    assert "EMA teacher" in text.split("not trained:")[1] and text.endswith(f"exported: the {backbone / 1e6:.2f}M backbone")


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_grad_norm_is_the_total_norm_before_clipping_with_or_without_a_clip(clip):

    from accelerate import Accelerator

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # frozen: not counted
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    expected = 0.5 * math.sqrt(sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert engine.clip_gradients(model, Accelerator(cpu=True), clip) == pytest.approx(expected)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.requires_grad))
    assert clipped == pytest.approx(min(expected, clip) if clip else expected)


@pytest.mark.fault(injected="a SimCLR-only run (objective.mim_weight=0, objective.dino_weight=0)",
                   did="its logs (derived values, metrics.jsonl, TensorBoard hparams) show no DINO or MIM setting; "
                       "a DINO run still shows them",
                   lost="nothing; before, a SimCLR run logged DINO's teacher temperature and EMA momentum")
def test_logs_show_only_the_settings_of_the_objectives_in_use(run_root, caplog):
    from types import SimpleNamespace

    from ssl_hybrid.config import log_derived

    simclr = tiny_config(run_root, "simclr", objective__mim_weight=0, objective__dino_weight=0,
                         objective__simclr_weight=1)
    with caplog.at_level("INFO", logger="ssl_hybrid.config"):
        log_derived(simclr)
    assert "derived effective_lr" in caplog.text and "teacher" not in caplog.text
    hparams = wiring.flat_hparams(simclr)
    assert "objective.simclr_temperature" in hparams and "data.image_size" in hparams
    assert not [k for k in hparams if "teacher" in k or k in ("objective.mask_ratio", "objective.decoder_dim")]
    assert {"objective.teacher_temp", "objective.mask_ratio"} <= set(wiring.flat_hparams(tiny_config(run_root)))
    stats = {"seen": 4, "skipped": 0, "epoch": 0, "skip_rate": 0.0}
    run = SimpleNamespace(settings=LoopSettings.from_config(simclr), counters=state.Counters(step=1), schedules=build_schedules(simclr),
                          stream=SimpleNamespace(stats=lambda: stats), directory=run_root,
                          accelerator=SimpleNamespace(is_main_process=True, log=lambda *args, **kwargs: None))
    engine.log_step(run, {"loss": 1.0, "simclr": 1.0}, 1.0, 4, None)
    record = runs.read_metrics(run_root)[-1]
    assert {"lr", "weight_decay", "simclr"} <= set(record) and not {"momentum", "teacher_temp"} & set(record)


# ------------------------------------------------------------------------------------- the loop

@pytest.mark.slow
def test_run_writes_config_metrics_tensorboard_knn_and_export(corpus, run_root, image_folder):
    config = tiny_config(run_root, "full", train__steps=3, train__checkpoint_every=1, train__keep_checkpoints=2,
                         train__knn_every=3, data__val=str(image_folder), data__num_local_views=1,
                         data__local_image_size=16 * 1)
    summary = engine.pretrain(config)
    directory = run_root / "full"
    assert summary["stopped"] == "done" and summary["step"] == 3
    assert (directory / "config.yaml").exists()
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_00000002", "step_00000003"]  # keep 2
    records = runs.read_metrics(directory)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "mim", "dino", "lr", "img_per_s", "grad_norm"))
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [0, 3] and all(0.0 <= r["knn_top1"] <= 1.0 for r in knn)
    assert all(r["knn_corpus"] == str(image_folder) for r in knn)  # which set the monitor scored
    assert list(directory.rglob("events.out.tfevents.*")), "TensorBoard events expected"
    model_config = json.loads((directory / "model" / "config.json").read_text())
    meta = model_config["ssl_hybrid"]
    assert model_config["architecture"] == "hybrid_nano" and meta["image_size"] == 32 and meta["step"] == 3
    assert model_config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert model_config["global_pool"] == "multiscale" and meta["token_pool"] == "token_avg"  # eval.pooling's
    in_checkpoint = json.loads((ckpt.latest_checkpoint(directory) / "backbone.json").read_text())
    assert in_checkpoint["model_name"] == model_config["architecture"] and in_checkpoint["run"] == meta["run"]
    from ssl_hybrid.eval.backbones import load_backbone_spec

    backbone, info = load_backbone_spec(str(directory))
    assert info["step"] == 3 and info["weights"] == str(directory / "model" / "model.safetensors")
    saved = load_file(str(ckpt.latest_checkpoint(directory) / "model.safetensors"))
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{name}"]), name
    # `ssl-hybrid export` of an earlier checkpoint writes that step's student backbone.
    from ssl_hybrid.cli import main

    step_dir = ckpt.list_checkpoints(directory)[0]
    assert main(["export", str(step_dir), "--out-dir", str(run_root / "exported")]) == 0
    exported = load_file(str(run_root / "exported" / "model.safetensors"))
    early = load_file(str(step_dir / "model.safetensors"))
    assert exported and all(torch.equal(v, early[f"backbone.{k}"]) for k, v in exported.items())
    assert json.loads((run_root / "exported" / "config.json").read_text())["ssl_hybrid"]["step"] == 2
    # The export records the budget; a re-run of the finished run trains nothing and keeps that record.
    record = meta["pretraining"]
    assert {k: record[k] for k in ("steps", "max_seconds", "stopped", "start_step")} == {
        "steps": 3, "max_seconds": 0.0, "stopped": "done", "start_step": 0}
    assert record["train_seconds"] > 0 and summary["train_seconds"] == record["train_seconds"]
    assert engine.pretrain(config)["train_seconds"] == record["train_seconds"]
    assert json.loads((directory / "model" / "config.json").read_text())["ssl_hybrid"]["pretraining"] == record


@pytest.mark.fault(injected="re-running a run name with a changed config",
                   did="refused with one line naming the differing keys, before the run directory is touched",
                   lost="nothing")
@pytest.mark.slow
def test_checkpoint_from_another_config_is_refused_before_touching_the_run(corpus, run_root):
    engine.pretrain(tiny_config(run_root, "same", train__steps=2))
    before = (run_root / "same" / "config.yaml").read_text()
    with pytest.raises(ckpt.CheckpointError, match=r"different config \(objective.mask_ratio: 0.75 -> 0.5"):
        engine.pretrain(tiny_config(run_root, "same", train__steps=2, objective__mask_ratio=0.5))
    assert (run_root / "same" / "config.yaml").read_text() == before
    # Observation-only keys may change: this resumes (nothing left to do) instead of refusing.
    assert engine.pretrain(tiny_config(run_root, "same", train__steps=2, train__log_every=5))["step"] == 2
    assert engine.pretrain(tiny_config(run_root, "same", train__steps=2, data__worker_nice=5))["step"] == 2


def test_checkpoint_from_before_a_key_existed_resumes_when_the_key_is_at_its_default(tmp_path):
    from ssl_hybrid.config import Config, to_dict

    saved = to_dict(Config())
    del saved["data"]["simclr_hue"]  # written by code that had no such key, so it did what the default does
    ckpt.check_compatible(saved, Config(), tmp_path)
    changed = Config()
    changed.data.simclr_hue = 0.0
    with pytest.raises(ckpt.CheckpointError, match=r"data.simclr_hue: 0.2 \(not recorded: the default\) -> 0.0"):
        ckpt.check_compatible(saved, changed, tmp_path)


def inject_nan(monkeypatch, bad_calls):
    """Make the loss of the given forward calls (1-based) NaN."""
    real = engine.forward_losses
    calls = []

    def forward(run, micro, step):
        losses, stats = real(run, micro, step)
        calls.append(step)
        if len(calls) in bad_calls or (None in bad_calls and len(calls) >= min(c for c in bad_calls if c)):
            losses["loss"] = losses["loss"] * float("nan")
        return losses, stats

    monkeypatch.setattr(engine, "forward_losses", forward)


@pytest.mark.fault(injected="a NaN loss in one step",
                   did="the step is skipped and counted (nonfinite_total)",
                   lost="that one batch")
@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(corpus, run_root, monkeypatch):
    inject_nan(monkeypatch, {2})
    summary = engine.pretrain(tiny_config(run_root, "spike", train__steps=3))
    assert summary["step"] == 3 and summary["nonfinite_total"] == 1
    weights = load_file(str(ckpt.latest_checkpoint(run_root / "spike") / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.fault(injected="NaN losses in every step from the third on",
                   did="stops after train.max_nonfinite_steps in a row with one line naming the last good "
                       "checkpoint",
                   lost="only the diverged steps (the last good checkpoint stays the newest)")
@pytest.mark.slow
def test_nonfinite_losses_in_a_row_stop_and_keep_last_good_checkpoint(corpus, run_root, monkeypatch):
    inject_nan(monkeypatch, {3, None})  # every call from the third on
    config = tiny_config(run_root, "diverge", train__steps=4, train__checkpoint_every=1,
                         train__max_nonfinite_steps=3)
    with pytest.raises(engine.NonFiniteLossError, match="3 non-finite steps .* in a row at step 2.*step_00000002"):
        engine.pretrain(config)
    assert ckpt.latest_checkpoint(run_root / "diverge").name == "step_00000002"


class BadGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), a non-finite gradient backward: an fp16 overflow or a bad
    op in the backward pass."""

    @staticmethod
    def forward(ctx, loss, value):
        ctx.value = value
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


@pytest.mark.fault(injected="a finite loss whose gradient is NaN in one step; a NaN image in the next (its forward "
                            "writes NaN into BatchNorm running statistics)",
                   did="both steps are skipped and counted like a non-finite loss (nonfinite_total), on every rank "
                       "(one all-reduce of both flags); the running statistics are restored; the checkpoints, "
                       "buffers included, stay finite",
                   lost="those two batches")
@pytest.mark.slow
def test_nonfinite_gradient_norm_or_forward_skips_the_step_and_keeps_the_model_finite(corpus, run_root, monkeypatch):
    real = engine.forward_losses
    calls = []

    def forward(run, micro, step):
        calls.append(step)
        if len(calls) == 3:
            micro = dict(micro, global_views=[view.clone() for view in micro["global_views"]])
            micro["global_views"][0][0] = float("nan")
        losses, stats = real(run, micro, step)
        if len(calls) == 2:
            losses["loss"] = BadGradient.apply(losses["loss"], float("nan"))
            assert torch.isfinite(losses["loss"]).all()
        return losses, stats

    monkeypatch.setattr(engine, "forward_losses", forward)
    summary = engine.pretrain(tiny_config(run_root, "badgrad", model__name="resvit_nano", train__steps=2,
                                        train__checkpoint_every=1, train__max_nonfinite_steps=3))
    assert summary["step"] == 2 and summary["nonfinite_total"] == 2 and len(calls) == 4
    for step in ckpt.list_checkpoints(run_root / "badgrad"):
        weights = load_file(str(step / "model.safetensors"))
        assert any("running_var" in name for name in weights)
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), step
    records = [json.loads(line) for line in (run_root / "badgrad" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["grad_norm"]) for r in records if "grad_norm" in r)


def test_one_all_reduce_per_step_agrees_on_the_flags_and_averages_the_loss_terms(monkeypatch):
    """reduce_step with a second rank simulated inside the one all-reduce it makes: a flag raised on either rank
    is raised on both, and each loss term is the mean over the ranks."""
    from types import SimpleNamespace

    other_rank = torch.tensor([1.0, 0.0, 3.0, 0.25], dtype=torch.float64)  # bad loss there; loss 3, std 0.25
    calls = []

    def all_reduce(tensor, op):
        calls.append(op)
        tensor += other_rank

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    bad_loss, bad_grad, means = engine.reduce_step(accelerator, (False, False), {"loss": 1.0, "embedding_std": 0.75})
    assert calls == [torch.distributed.ReduceOp.SUM]
    assert (bad_loss, bad_grad) == (1.0, 0.0) and means == {"loss": 2.0, "embedding_std": 0.5}


def test_a_skipped_step_resets_the_fp16_grad_scaler_and_backs_off_its_scale():
    """The fp16 path of skip_step on a real GradScaler (CPU): the overflowed step leaves no state that would
    make the next step's unscale fail, and halves the loss scale as a skipped scaler.step() would."""
    from types import SimpleNamespace

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    skipped = []
    run = SimpleNamespace(optimizer=optimizer, accelerator=SimpleNamespace(scaler=scaler),
                          raw_model=SimpleNamespace(after_skipped_step=lambda: skipped.append(True)))
    scaler.scale((param * float("inf")).sum()).backward()
    scaler.unscale_(optimizer)  # what clip_gradients does
    engine.skip_step(run)
    assert scaler.get_scale() == 512.0 and param.grad is None and skipped == [True]
    scaler.scale(param.sum()).backward()
    scaler.unscale_(optimizer)  # raises if the skipped step's unscale state were left behind
    scaler.step(optimizer)
    scaler.update()
    assert torch.allclose(param.detach(), torch.full((3,), 0.9))


@pytest.mark.fault(injected="an fp16 run whose first 8 steps overflow (loss scale 2**16 backing off), train.max_nonfinite_steps=5",
                   did="the steps are skipped and counted in nonfinite_total but not towards the in-a-row stop, while the scale is >= 1; a non-finite loss still counts",
                   lost="nothing; before, a healthy fp16 run stopped at its fifth overflow")
def test_fp16_scaler_back_off_is_not_a_diverging_run():
    from types import SimpleNamespace

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    run = SimpleNamespace(accelerator=SimpleNamespace(scaler=scaler), counters=state.Counters(), directory=Path("."),
                          settings=SimpleNamespace(max_nonfinite_steps=5))
    for _ in range(8):  # what the loop reports for an overflowed step, after skip_step's scaler.update()
        scaler._scale = scaler._scale / 2 if scaler._scale is not None else torch.tensor(2.0 ** 15)
        values = {"nonfinite": 1.0, "nonfinite_loss": 0.0, "fp16_overflow": float(engine.scaler_overflow(run, False))}
        assert not engine.handle_nonfinite(run, values)
    assert run.counters.nonfinite_total == 8 and run.counters.nonfinite_in_row == 0
    assert not engine.scaler_overflow(run, True)  # a non-finite loss is never the scaler's business
    scaler._scale = torch.tensor(0.5)
    assert not engine.scaler_overflow(run, False)  # pushed below 1: the gradients are bad at any scale
    with pytest.raises(engine.NonFiniteLossError):
        for _ in range(5):
            engine.handle_nonfinite(run, {"nonfinite": 1.0, "nonfinite_loss": 1.0, "fp16_overflow": 0.0})


@pytest.mark.slow
def test_max_seconds_stops_with_checkpoint_and_export(corpus, run_root):
    summary = engine.pretrain(tiny_config(run_root, "budget", train__steps=50, train__max_seconds=0.01))
    assert summary["stopped"] == "max_seconds" and 1 <= summary["step"] < 50
    record = json.loads((run_root / "budget" / "model" / "config.json").read_text())["ssl_hybrid"]["pretraining"]
    assert record["stopped"] == "max_seconds" and record["max_seconds"] == 0.01 and record["steps"] == 50
    assert ckpt.latest_checkpoint(run_root / "budget").name == f"step_{summary['step']:08d}"
    assert (run_root / "budget" / "model" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["quickstart", "hybrid_small_joint", "hybrid_small_mim", "hybrid_small_dino",
                                    "simclr"])
def test_every_recipe_runs_a_step(corpus, run_root, recipe):
    from tests.train.trainhelpers import REPO

    overrides = tiny_overrides(run_root, recipe, train__steps=1, train__mixed_precision="'no'",
                               data__num_local_views=min(1, load_config(REPO / f"recipes/{recipe}.yaml").data.num_local_views),
                               data__local_image_size=16, data__val="''", train__knn_every=0)
    keep = [o for o in overrides if not o.startswith(("objective.mim_weight", "objective.dino_weight"))]
    config = load_config(REPO / f"recipes/{recipe}.yaml", keep)
    summary = engine.pretrain(config)
    assert summary["step"] == 1
    record = [r for r in runs.read_metrics(run_root / recipe) if "loss" in r][-1]
    assert math.isfinite(record["loss"])
    # DINO's schedules are logged only when DINO is on (a SimCLR run does not show settings it does not use)
    assert ("teacher_temp" in record) == ("momentum" in record) == (config.objective.dino_weight > 0)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_whole_batch(corpus, run_root):
    """2 micro-batches of 2 == 1 batch of 4: same masks, same DINO center, same update (no drop-path)."""
    weights = {}
    for accum in (1, 2):
        config = tiny_config(run_root, f"accum{accum}", train__steps=1, train__grad_accum_steps=accum,
                             model__drop_path_rate=0.0)
        engine.pretrain(config)
        weights[accum] = load_file(str(ckpt.latest_checkpoint(run_root / f"accum{accum}") / "model.safetensors"))
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[2][name], value, rtol=1e-4, atol=2e-6, msg=name)


def test_gradient_accumulation_is_refused_for_simclr():
    from ssl_hybrid.errors import ConfigError

    with pytest.raises(ConfigError, match="in-batch negatives"):
        load_config(None, ["objective.simclr_weight=1", "train.grad_accum_steps=2", "train.batch_size=8"])


@pytest.mark.slow
def test_collapse_is_warned_about(corpus, run_root, monkeypatch, caplog):
    real = engine.forward_losses

    def collapsed(run, micro, step):
        losses, stats = real(run, micro, step)
        return losses, dict(stats, embedding_std=torch.tensor(0.001))

    monkeypatch.setattr(engine, "forward_losses", collapsed)
    engine.pretrain(tiny_config(run_root, "collapse", train__steps=1))
    assert "embeddings are collapsing" in caplog.text


@pytest.mark.fault(injected="a corrupt JPEG in a training shard",
                   did="skipped, logged with its key, counted as data_skipped in metrics.jsonl",
                   lost="that sample")
@pytest.mark.slow
def test_corrupt_samples_are_counted_and_logged(corpus, run_root, tmp_path, caplog):
    import io
    import tarfile

    source = sorted(corpus.glob("*.tar"))[0]
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(source) as good, tarfile.open(shard, "w") as out:
        data = b"\xff\xd8\xff\xe0 not really a jpeg"  # a JPEG header with garbage after it, first in the shard
        info = tarfile.TarInfo("zz_corrupt.jpg")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
        for member in good.getmembers():
            out.addfile(member, good.extractfile(member))
    config = tiny_config(run_root, "corrupt", train__steps=2, data__train=str(shard), data__resampled="false",
                         data__shuffle_buffer=0, data__max_skip_rate=0.5)
    engine.pretrain(config)
    last = [r for r in runs.read_metrics(run_root / "corrupt") if "loss" in r][-1]
    assert last["data_skipped"] == 1 and last["data_seen"] >= 9
    assert "zz_corrupt" in caplog.text and "1 corrupt/unreadable samples skipped" in caplog.text


@pytest.mark.parametrize("precision, dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_dtype_is_what_the_accelerators_autocast_computes_in(precision, dtype):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    assert device.autocast_dtype(accelerator) == dtype
    with accelerator.autocast():
        assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2)).dtype == dtype


@pytest.mark.slow
def test_bf16_autocast_logs_the_dtype_and_keeps_losses_fp32(corpus, run_root, caplog):
    caplog.set_level("INFO")
    summary = engine.pretrain(tiny_config(run_root, "bf16", train__steps=1, train__mixed_precision="bf16"))
    assert summary["step"] == 1
    assert "mixed precision 'bf16': autocast runs matmuls/convolutions in torch.bfloat16" in caplog.text
    record = [r for r in runs.read_metrics(run_root / "bf16") if "loss" in r][-1]
    assert math.isfinite(record["loss"])
