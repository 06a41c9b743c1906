"""Everything a pretraining job is built from, built once from the config: the accelerator, the model and its
objectives, the optimizer, the schedules, the data stream, the monitor, the run folder (claimed, checked,
resumed). The loop that runs it is ``train.engine``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssl_hybrid import runs
from ssl_hybrid.config import Config, log_derived, run_dir, to_dict, unused_settings, validate
from ssl_hybrid.device import autocast_dtype, make_accelerator, sync_flags
from ssl_hybrid.errors import UserError
from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train.optim import build_optimizer
from ssl_hybrid.train.params import describe_parameters
from ssl_hybrid.train.schedules import build_schedules
from ssl_hybrid.train.settings import LoopSettings
from ssl_hybrid.train.state import Run, resume

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ssl_hybrid.train.monitor import KNNMonitor

log = logging.getLogger(__name__)


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
    if config.data.channels != 3:  # timm's convention; 3 stays implicit so RGB models record what they always did
        kwargs["in_chans"] = config.data.channels
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
        backbone.set_grad_checkpointing(True)  # type: ignore[operator]  # timm's model contract, not nn.Module's
    return backbone


def build_accelerator(config: Config, directory: Path) -> Accelerator:
    from accelerate.utils import DistributedDataParallelKwargs

    # Every parameter gets a gradient in every step of each objective (tested), so DDP needs no
    # unused-parameter search.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return make_accelerator(
        config.train.mixed_precision, log_with="tensorboard", project_dir=str(directory), kwargs_handlers=[ddp]
    )


def build_monitor(config: Config) -> KNNMonitor | None:
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


def setup(config: Config, fresh: bool = False, held: contextlib.ExitStack | None = None) -> Run:
    """Build the run; the run folder is claimed (its lock entered into ``held``), checked against this config
    and its data, or deleted (``fresh``) only after the model and the data stream have been built."""
    from accelerate.utils import set_seed

    from ssl_hybrid.data.augment import device_augment
    from ssl_hybrid.data.channels import stream_normalization
    from ssl_hybrid.data.shards import manifest_fingerprint
    from ssl_hybrid.data.stream import build_train_stream
    from ssl_hybrid.data.views import build_transform

    directory = run_dir(config)
    accelerator = build_accelerator(config, directory)
    validate(config, source="config", num_processes=accelerator.num_processes)
    derived = log_derived(config, accelerator.num_processes)
    set_seed(config.train.seed)  # identical initial weights on every process
    raw_model = PretrainModel(build_backbone(config), ObjectiveSettings.from_config(config))
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    optimizer = build_optimizer(raw_model, config.optim)
    norm = stream_normalization(config.data)  # per-channel statistics of N-channel shards; None for RGB photos
    stream = build_train_stream(
        config.data,
        derived["per_process_batch_size"],
        config.train.seed,
        accelerator.process_index,
        accelerator.num_processes,
        build_transform(config.data, norm),
    )
    fingerprint = manifest_fingerprint(stream.urls)
    existing = open_run_folder(accelerator, config, fresh, fingerprint, held)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    run = Run(
        config,
        LoopSettings.from_config(config),
        accelerator,
        directory,
        model,
        raw_model,
        optimizer,
        build_schedules(config, accelerator.num_processes),
        stream,
        data_fingerprint=fingerprint,
        augment=device_augment(config.data, norm),
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
    log.info(
        "mixed precision '%s': autocast runs matmuls/convolutions in %s, normalization/softmax/losses in float32",
        accelerator.mixed_precision,
        autocast_dtype(accelerator),
    )
    log.info("parameters: %s", describe_parameters(raw_model))
    return run


def open_run_folder(
    accelerator: Accelerator, config: Config, fresh: bool, fingerprint: str | None, held: contextlib.ExitStack | None
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
    existing: tuple[Path, dict[str, Any]] | None = None
    unreadable: list[Path] = []
    if not fresh:
        existing, unreadable = newest_readable(accelerator, config, directory)
    if existing is not None:
        ckpt.check_data(existing[1]["state"].get("data_fingerprint"), fingerprint, config, existing[0])

    def prepare() -> None:
        for path in unreadable:
            log.warning("set aside the unreadable checkpoint %s as %s", path, ckpt.set_aside(path).name)
        runs.prepare_run_dir(config)
        ckpt.remove_partial(directory)

    on_main(accelerator, prepare)
    return existing


def newest_readable(
    accelerator: Accelerator, config: Config, directory: Path
) -> tuple[tuple[Path, dict[str, Any]] | None, list[Path]]:
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
        if not failed and loaded is not None:
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


def on_main(accelerator: Accelerator, action: Callable[[], None]) -> None:
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
