"""A run's backbone -> a model folder (``ssl_hybrid.models.export``): at the end of training (``<run>/model/``)
and from any checkpoint with ``ssl-hybrid export`` (``<run>/model/`` for a run's newest checkpoint,
``<run>/exports/step_<N>/`` for a given one), outside ``checkpoints/``, which pruning deletes.

The folder's default pooling is the one the evaluators score (``eval.pooling``): our backbones are saved
with ``global_pool="multiscale"`` when that is ``multiscale``, so ``model(x)`` is the embedding of the
report, not the plain token pooling; the token pooling they trained with is recorded for the evaluators.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml
from safetensors.torch import load_file
from torch import nn

from ssl_hybrid.config import Config, from_dict, to_dict
from ssl_hybrid.errors import UserError
from ssl_hybrid.models.contract import TokenBackbone
from ssl_hybrid.runs import CHECKPOINTS_DIR
from ssl_hybrid.train import checkpoint as ckpt

if TYPE_CHECKING:
    from ssl_hybrid.train.state import Run

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # <run>/model/: the end-of-run export, and `ssl-hybrid export RUN`'s default
EXPORTS_DIR = "exports"  # <run>/exports/step_<N>/: `ssl-hybrid export <step dir>`'s default


def resolve_checkpoint(path: Path) -> Path:
    """A step directory as given, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / ckpt.MODEL_FILE).exists() and (path / ckpt.STATE_FILE).exists():
        return path
    newest = ckpt.latest_checkpoint(path)
    if newest is None:
        raise ckpt.CheckpointError(
            f"{path}: neither a checkpoint directory nor a run with complete "
            "checkpoints/step_*/ (each holding model.safetensors + state.pt)"
        )
    return newest


@contextlib.contextmanager
def scored_pooling(backbone: nn.Module, pooling: str) -> Iterator[str | None]:
    """``backbone`` pooled as the evaluators score it while the block runs; yields the token pooling it had.

    Only our backbones have a ``multiscale`` global_pool; a timm CNN keeps its own pooling (the card says
    that the evaluators' multi-scale embedding is ``ssl_hybrid.models.pooling.multiscale_embed``)."""
    before: Any = getattr(backbone, "global_pool", None)  # a str on ours, a pooling module on some timm models
    switch = pooling == "multiscale" and hasattr(backbone, "forward_multiscale") and backbone.num_classes == 0
    ours = cast(TokenBackbone, backbone)  # what is switched: only ours have forward_multiscale
    if switch:
        ours.global_pool = "multiscale"
    try:
        yield before if isinstance(before, str) else None
    finally:
        if switch:
            ours.global_pool = before


def training_meta(config: Config, normalization: Any = "from data") -> dict[str, Any]:
    """What the trainer adds to ``backbone.json`` (checkpoints) and the model folder's record besides how to rebuild the
    backbone (``models.export.make_meta`` reads that from the model): pretraining image size, run, objective, and for
    N-channel data the per-channel ``normalization`` (a run passes what its stream applies)."""
    from ssl_hybrid.data.channels import stream_normalization

    meta = {
        "image_size": config.data.image_size,
        "run": config.name,
        "objective": {k: v for k, v in to_dict(config)["objective"].items() if k.endswith("_weight")},
    }
    if normalization == "from data":  # an export without a record reads the data's manifest
        norm = stream_normalization(config.data) if config.data.channels != 3 else None
        normalization = norm.record() if norm is not None else None
    if normalization:  # N-channel data: what evaluators, embed and predict must normalise with
        meta["normalization"] = normalization
    return meta


def run_normalization(run: Any) -> dict[str, Any] | None:
    """The N-channel normalisation the run's stream applies (None for RGB photos)."""
    spec = getattr(getattr(run, "stream", None), "spec", None)
    norm = getattr(getattr(spec, "transform", None), "norm", None)
    return norm.record() if norm is not None else None


def save_run_model(
    backbone: nn.Module,
    config: Config,
    directory: Path,
    record: dict[str, Any],
    *,
    force: bool = False,
    run_dir: Path | None = None,
) -> Path:
    """Write ``backbone`` as a model folder with the run's record (``training_meta`` + ``record``) and, when
    the run has a report, its table on the model card."""
    from ssl_hybrid.models.export import public_source, save_model_folder
    from ssl_hybrid.models.pooling import offers_multiscale

    scored = "multiscale" if config.eval.pooling == "multiscale" and offers_multiscale(backbone) else "default"
    record = dict(record)
    normalization = record.pop("normalization", "from data")  # N-channel runs: what their stream normalised with
    with scored_pooling(backbone, config.eval.pooling) as token_pool:
        extra = dict(
            training_meta(config, normalization),
            data=public_source(config.data.train),
            scored_pooling=scored,
            token_pool=token_pool,
            **record,
        )
        return save_model_folder(
            backbone, directory, extra=extra, force=force, evaluation=_report_table(run_dir) if run_dir else None
        )


def refresh_model_card(run_dir: Path) -> Path | None:
    """Put the run's report table on its model folder's card (after ``quickstart``/``report`` wrote it)."""
    from ssl_hybrid.models.export import is_model_folder, write_model_card

    table = _report_table(run_dir)
    if table is None or not is_model_folder(Path(run_dir) / MODEL_DIR):
        return None
    return write_model_card(Path(run_dir) / MODEL_DIR, table)


def _report_table(run_dir: Path) -> str | None:
    """The evaluation table of the run's report (``report.json``, written by ``quickstart``/``report``)."""
    path = Path(run_dir) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    table = report.get("table") if isinstance(report, dict) else None
    verdict = (report.get("verdict") or {}).get("line") if isinstance(report.get("verdict"), dict) else None
    return (table or "") + (f"\nVerdict: {verdict}\n" if verdict else "") if table else None


def default_out_dir(path: Path, step_dir: Path) -> Path:
    run = step_dir.parent.parent
    return run / MODEL_DIR if Path(path).resolve() == run.resolve() else run / EXPORTS_DIR / step_dir.name


def export_checkpoint(path: Path, out_dir: Path | None = None, force: bool = False) -> Path:
    """Write the checkpoint's student backbone as a model folder; returns the folder.

    Default folder: ``default_out_dir``. An existing folder is replaced only with ``force``; a folder inside
    the run's ``checkpoints/`` is refused (pruning deletes what is there)."""
    from ssl_hybrid.models.export import LEGACY_WEIGHTS_NAME

    if (Path(path) / LEGACY_WEIGHTS_NAME).exists() and ckpt.latest_checkpoint(path) is None:
        out = Path(out_dir) if out_dir else Path(path) / MODEL_DIR
        with export_lock(Path(path), out):
            return _convert_old_export(Path(path), out, force)
    step_dir = resolve_checkpoint(path)
    out = Path(out_dir) if out_dir else default_out_dir(path, step_dir)
    checkpoints = step_dir.parent.resolve()
    if step_dir.parent.name == CHECKPOINTS_DIR and out.resolve().is_relative_to(checkpoints):
        raise UserError(
            f"{out}: inside {checkpoints}, whose old checkpoints are deleted as training goes on; "
            "export outside it (--out-dir)"
        )
    run = step_dir.parent.parent if step_dir.parent.name == CHECKPOINTS_DIR else None
    with export_lock(run, out):
        return _export_step(step_dir, out, force)


@contextlib.contextmanager
def export_lock(run: Path | None, out: Path) -> Iterator[None]:
    """The run folder's lock (:func:`ssl_hybrid.runs.claim`, the trainer's) around an export written inside the
    run folder (``model/``, ``exports/``): the trainer writes ``model/`` itself, so an export there while it trains
    would race it (with --force: replace it mid-write). An export elsewhere needs no lock: the trainer never writes
    there, and a checkpoint can be exported while its run goes on."""
    from ssl_hybrid.runs import RunInUseError, claim, lock_path

    if run is None or not out.resolve().is_relative_to(run.resolve()):
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(claim(run))
        except RunInUseError:
            raise RunInUseError(
                f"{out}: {run} is in use by another ssl-hybrid process, e.g. its trainer (it holds "
                f"{lock_path(run)}); export when it has ended, or elsewhere with --out-dir"
            ) from None
        yield


def _export_step(step_dir: Path, out: Path, force: bool) -> Path:
    """The export of one checkpoint ``step_dir`` into ``out`` (see :func:`export_checkpoint`)."""
    from ssl_hybrid.models.export import CHECKPOINT_BACKBONE_PREFIX, META_NAME, ModelFolderError
    from ssl_hybrid.models.factory import check_factory_args
    from ssl_hybrid.train.wiring import build_backbone, model_kwargs

    if out.exists() and not force:
        raise ModelFolderError(
            f"{out}: already exists; pass --force to replace it "
            "(the new folder is complete before the old one is removed)"
        )
    config_file = step_dir / "config.yaml"
    if not config_file.exists():
        raise ckpt.CheckpointError(f"{step_dir}: no config.yaml, cannot tell which backbone it holds")
    config = from_dict(yaml.safe_load(config_file.read_text(encoding="utf-8")), source=str(config_file))
    config.model.drop_path_rate = 0.0  # inference copy; weights are independent of it
    # The checkpoint's config.yaml is a file like any other: it may only name the model class's own arguments.
    check_factory_args(config.model.name, dict(model_kwargs(config), drop_path_rate=0.0), str(config_file))
    backbone = build_backbone(config)
    weights = load_file(str(step_dir / ckpt.MODEL_FILE))
    state = {
        k[len(CHECKPOINT_BACKBONE_PREFIX) :]: v for k, v in weights.items() if k.startswith(CHECKPOINT_BACKBONE_PREFIX)
    }
    ckpt.load_model_state(backbone, state, step_dir)
    step = int(step_dir.name.split("_")[1]) if step_dir.name.startswith("step_") else None
    record = {"step": step, "pretraining": _budget(step_dir.parent.parent, config)}
    if config.data.channels != 3 or (step_dir / META_NAME).exists():  # the normalisation the run recorded
        record["normalization"] = _recorded_normalization(step_dir / META_NAME)
    folder = save_run_model(backbone.eval(), config, out, record, force=force, run_dir=step_dir.parent.parent)
    log.info("exported %s (step %s)", folder, step)
    return folder


def _recorded_normalization(meta_file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(meta_file.read_text(encoding="utf-8")).get("normalization")
    except (OSError, ValueError, AttributeError):
        return None


def _convert_old_export(run: Path, out: Path, force: bool) -> Path:
    """A run whose checkpoints are gone but whose old export (backbone.safetensors + backbone.json) is
    there: the same weights as a model folder, with the old record."""
    from ssl_hybrid.models.export import read_meta, rebuild, save_model_folder

    weights, meta = read_meta(run)
    model, _ = rebuild(weights, meta)
    record: dict[str, Any] = {k: meta[k] for k in ("run", "step", "objective", "pretraining") if k in meta}
    config_file = run / "config.yaml"
    if not config_file.exists():
        return save_model_folder(model, out, extra=dict(record, image_size=meta.get("image_size")), force=force)
    config = from_dict(yaml.safe_load(config_file.read_text(encoding="utf-8")), source=str(config_file))
    return save_run_model(model, config, out, record, force=force, run_dir=run)


def _budget(run_dir: Path, config: Config) -> dict[str, Any]:
    """The run's budget record as its end-of-run export wrote it (model folder or old export), else the
    planned steps and time limit from its config."""
    from ssl_hybrid.models.export import META_NAME, RECORD_KEY

    for path, section in ((run_dir / MODEL_DIR / "config.json", RECORD_KEY), (run_dir / META_NAME, None)):
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            budget = (values.get(section) or {} if section else values).get("pretraining")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(budget, dict):
            return budget
    return {"steps": config.train.steps, "max_seconds": config.train.max_seconds}


def budget_record(run: Run) -> dict[str, Any]:
    """The budget and what was used of it: steps planned, max_seconds (0 = none), why training stopped,
    and the training time of the session that trained from ``start_step`` (a resumed run trained before
    that too). A session that trained nothing (re-run of a finished run) keeps the exported record."""
    if run.counters.step == run.start_step:
        previous = exported_record(run.directory)
        if previous and previous.get("steps") == run.settings.steps:
            return previous
    return {
        "steps": run.settings.steps,
        "max_seconds": run.settings.max_seconds,
        "stopped": run.stop_reason or "done",
        "start_step": run.start_step,
        "train_seconds": round(run.train_seconds, 1),
        "startup_seconds": round(run.startup_seconds, 1),
    }


def exported_record(directory: Path) -> dict[str, Any] | None:
    """The budget record of the run's export; None when it has not been exported yet."""
    from ssl_hybrid.models.export import RECORD_KEY, BackboneLoadError, read_model_config

    try:
        return (read_model_config(directory / MODEL_DIR).get(RECORD_KEY) or {}).get("pretraining")
    except BackboneLoadError:  # not exported yet (or the export is unreadable): a new record is written
        return None


def export_backbone(run: Run, budget: dict[str, Any]) -> Path | None:
    """The run's model folder ``<run>/model/``; the run owns it, so a finished re-run replaces it (atomically)."""
    from ssl_hybrid.device import sync_flags

    run.accelerator.wait_for_everyone()
    failure = None
    if run.accelerator.is_main_process:
        try:
            folder = save_run_model(
                run.raw_model.backbone,
                run.config,
                run.directory / MODEL_DIR,
                {"step": run.counters.step, "pretraining": budget, "normalization": run_normalization(run)},
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
