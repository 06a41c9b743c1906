"""The trained proxy score: a short pretraining run of the candidate, then DINO-protocol k-NN top-1 of
its frozen features on a small labeled set.

Each (candidate, rung) trains in its own run directory ``<search>/runs/<id>-r<rung>`` through the same
trainer entry point as ``ssl-hybrid pretrain`` (so a proxy run is exactly a recipe run with fewer steps),
and the exported backbone is loaded back with the evaluators' loader. The trainer resumes a run
directory from its newest checkpoint, so an interrupted proxy run continues instead of starting over.

The labeled images are decoded and transformed once per search and kept as tensors (a few MB at proxy
sizes): every candidate is evaluated on identical inputs and no candidate pays for JPEG decoding.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_hybrid.config import KNN_PROTOCOLS, POOLINGS, EvalConfig
from ssl_hybrid.errors import UserError
from ssl_hybrid.search.recipe import candidate_config
from ssl_hybrid.search.space import Candidate, build_candidate

log = logging.getLogger(__name__)


@dataclass
class ProxyConfig:
    """How each candidate is scored (used by the trained proxy; ignored with an injected scorer)."""

    # Base pretraining recipe (data, objective, optimizer); "" = the defaults.
    recipe: str = ""
    # Pretraining data: shards / a shard directory, or an image folder (converted once to <search>/shards);
    # "" = the base recipe's data.train.
    train: str = ""
    # Longest image side when an image folder is converted (0 = keep); proxy runs use small crops anyway.
    shard_max_side: int = 160
    # key=value changes to the base recipe that the chosen recipe keeps too (e.g. the objective, the lr).
    recipe_overrides: list = field(default_factory=list)
    # key=value overrides for the proxy runs only, applied after the candidate's model group (e.g.
    # data.image_size=64, a smaller batch); chosen.yaml does not carry them.
    overrides: list = field(default_factory=list)
    # Labeled image folder (or labeled shards) whose images form the k-NN bank.
    knn_train: str = ""
    # Labeled queries; "" = a stratified 25% hold-out of knn_train.
    knn_test: str = ""
    # Labeled images per class in the bank (0 = all of knn_train): few labels is the regime we care about.
    knn_shots: int = 0
    # "heldout": the knn_test images (or the hold-out) are the queries and knn_train the bank (as eval.knn_protocol).
    # "leave_one_out": knn_train and knn_test pooled, every image a query against all the others: on a small
    # labeled set every label counts as a query, which halves the score's binomial noise at 4x the queries.
    knn_protocol: str = EvalConfig.knn_protocol
    # DINO's k-NN protocol, as in the evaluation (eval.knn_k, eval.knn_temperature).
    knn_k: int = EvalConfig.knn_k
    knn_temperature: float = EvalConfig.knn_temperature
    # Frozen-feature pooling, as in the evaluation (eval.pooling): multiscale or default.
    pooling: str = EvalConfig.pooling
    # Also score each candidate at random init (no training), so the table shows what pretraining added.
    score_init: bool = True
    # Keep each proxy run's resumable checkpoints (~100 MB each) after it is scored; the exported
    # model folder (model/) is always kept. Off: a scored run never needs resuming (state.json has its score).
    keep_checkpoints: bool = False
    # Seed for the bank's k-shot draw and the hold-out split.
    seed: int = 0
    # Steps of the run that times a candidate's pretraining step when the schedule budgets seconds
    # (schedule.min_seconds); a 1-step run's CPU time is subtracted (startup is not a step).
    calibration_steps: int = 6

    def check(self) -> None:
        if not self.knn_train:
            raise UserError(
                "search.proxy.knn_train: name a labeled image folder for the k-NN score "
                "(class sub-folders), e.g. proxy.knn_train=/data/flowers/train"
            )
        if self.knn_shots < 0 or self.knn_k < 1:
            raise UserError("search.proxy.knn_shots must be >= 0 and search.proxy.knn_k >= 1")
        if self.pooling not in POOLINGS:
            raise UserError(f"search.proxy.pooling = {self.pooling!r}: use one of {', '.join(POOLINGS)}")
        if self.knn_protocol not in KNN_PROTOCOLS:
            raise UserError(f"search.proxy.knn_protocol = {self.knn_protocol!r}: use one of {', '.join(KNN_PROTOCOLS)}")
        if self.knn_protocol == "leave_one_out" and self.knn_shots:
            raise UserError("search.proxy.knn_shots needs knn_protocol=heldout (leave_one_out uses every label)")


class KnnSets:
    """The labeled bank and query sets: loaded and split once, decoded once per image size."""

    def __init__(self, proxy: ProxyConfig):
        from ssl_hybrid.data.labeled import LabeledSet, align_classes, kshot_indices, load_labeled, stratified_holdout

        proxy.check()
        self.leave_one_out = proxy.knn_protocol == "leave_one_out"
        train = load_labeled(proxy.knn_train)
        if proxy.knn_test:
            test = align_classes(train, load_labeled(proxy.knn_test))
            if self.leave_one_out:  # one pool: every image a query, the others its bank
                train = LabeledSet(train.source, train.classes, train.samples + test.samples)
                test = train
        elif self.leave_one_out:
            test = train
        else:
            bank_idx, query_idx = stratified_holdout(train.labels, 0.25, proxy.seed)
            train, test = train.subset(bank_idx), train.subset(query_idx)
        if proxy.knn_shots:
            train = train.subset(kshot_indices(train.labels, proxy.knn_shots, proxy.seed))
        self.train, self.test = train, test
        self.num_classes = len(train.classes)
        self._tensors: dict[tuple[str, int], torch.Tensor] = {}
        if self.leave_one_out:
            log.info("k-NN proxy: %d labeled images, each a query against the others", len(train))
        else:
            log.info("k-NN proxy: bank %d images, %d queries, %d classes", len(train), len(test), self.num_classes)

    def images(self, which: str, image_size: int) -> torch.Tensor:
        """All images of ``which`` ("train" | "test") under the eval transform: [N, 3, S, S], cached."""
        from ssl_hybrid.eval.features import eval_transform

        key = (which, image_size)
        if key not in self._tensors:
            labeled, transform = getattr(self, which), eval_transform(image_size)
            self._tensors[key] = torch.stack([transform(labeled.load_image(i)) for i in range(len(labeled))])
        return self._tensors[key]

    def loader(self, which: str, image_size: int, batch_size: int = EvalConfig.batch_size):
        """(images, labels, indices) batches in dataset order, the contract of ``extract_features``."""
        images = self.images(which, image_size)
        labels = torch.as_tensor(getattr(self, which).labels)
        dataset = torch.utils.data.TensorDataset(images, labels, torch.arange(len(images)))
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)

    def sample_images(self, count: int, image_size: int, seed: int) -> torch.Tensor:
        """A fixed batch of bank images [count, 3, S, S] (for the zero-cost proxy)."""
        images = self.images("train", image_size)
        picks = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
        return images[torch.as_tensor(np.sort(picks))]

    def evaluate(self, backbone: torch.nn.Module, image_size: int, proxy: ProxyConfig) -> dict[str, Any]:
        from ssl_hybrid.eval.features import NonFiniteError, extract_features, pooling_forward
        from ssl_hybrid.eval.knn import faiss_threads, knn_evaluate, leave_one_out_knn

        forward = pooling_forward(backbone, proxy.pooling)  # what the evaluators score, not the token pooling alone
        try:
            bank = extract_features(backbone, self.loader("train", image_size), forward=forward, name="the candidate")
            if self.leave_one_out:
                with faiss_threads():
                    return leave_one_out_knn(*bank, k=proxy.knn_k, temperature=proxy.knn_temperature)
            queries = extract_features(backbone, self.loader("test", image_size), forward=forward, name="the candidate")
        except NonFiniteError as err:  # a candidate that diverged fails alone (halving scores it None)
            raise RuntimeError(str(err)) from None
        return knn_evaluate(
            *bank,
            *queries,
            ks=(proxy.knn_k,),
            headline_k=proxy.knn_k,
            temperature=proxy.knn_temperature,
            num_classes=self.num_classes,
        )


def prepare_train_data(proxy: ProxyConfig, work_dir: Path) -> str | None:
    """``proxy.train`` as something the trainer streams: shards as given; an image folder converted once."""
    if not proxy.train:
        return None
    source = Path(proxy.train)
    if not source.is_dir() or (source / "manifest.json").exists():
        return proxy.train
    out = Path(work_dir) / "shards"
    if (out / "manifest.json").exists():
        return str(out)
    from ssl_hybrid.data.shards import write_shards

    log.info("converting image folder %s to shards in %s (once per search)", source, out)
    write_shards(source, out, shard_size=250, max_side=proxy.shard_max_side, labels="none", progress=False)
    return str(out)


def recipe_channels(recipe: dict[str, Any]) -> int:
    """``data.channels`` of a recipe dict (3, the RGB default, when it does not say)."""
    return int((recipe.get("data") or {}).get("channels", 3))


class PretrainKnnProxy:
    """scorer(candidate, steps, rung, seed=None) -> {"score": k-NN top-1, ...} via a real pretraining run."""

    def __init__(self, proxy: ProxyConfig, work_dir: Path, sets: KnnSets | None = None):
        from ssl_hybrid.search.recipe import read_recipe

        self.proxy = proxy
        self.work_dir = Path(work_dir)
        self.base = read_recipe(proxy.recipe, proxy.recipe_overrides)
        channels = recipe_channels(self.base)
        if channels != 3:  # KnnSets decodes RGB images: every candidate would fail on its first batch
            raise UserError(
                f"search: data.channels = {channels} in the proxy's recipe; the search scores RGB images only "
                "(search an RGB rendering of your data, or pretrain the presets on the N-channel data directly)"
            )
        self.sets = sets or KnnSets(proxy)
        self.train_data = prepare_train_data(proxy, self.work_dir)

    def config_for(self, candidate: Candidate, steps: int, rung: int | str, seed: int | None = None):
        name = f"{candidate.id}-r{rung}" + (f"-s{seed}" if seed is not None else "")
        data = [f"data.train={self.train_data}"] if self.train_data else []
        overrides = [*data, *self.proxy.overrides, f"train.steps={steps}", f"train.output_dir={self.work_dir / 'runs'}"]
        if seed is not None:  # a confirmation run: the same recipe with another training seed
            overrides.append(f"train.seed={seed}")
        return candidate_config(self.base, candidate, overrides, self.work_dir / "recipes", name)

    def step_seconds(self, candidate: Candidate) -> float:
        """CPU seconds per pretraining step of ``candidate`` on this machine (data loading, views, objective
        and optimizer included): process CPU time of a ``calibration_steps`` run minus that of a 1-step run,
        so startup is not counted. CPU time, not wall time: on a machine of your own with one compute thread
        they are the same, and on a shared one another job's load does not shrink one candidate's budget."""
        from ssl_hybrid.config import run_dir
        from ssl_hybrid.runs import lock_path

        cpu = []
        for steps in (1, max(2, self.proxy.calibration_steps)):
            config = self.config_for(candidate, steps, f"calib{steps}")
            shutil.rmtree(run_dir(config), ignore_errors=True)  # an interrupted timing run must not be resumed
            start = time.process_time()
            check_finished(pretrain(config), config)
            cpu.append((steps, time.process_time() - start))
            shutil.rmtree(run_dir(config), ignore_errors=True)  # a timing run: nothing in it is kept,
            lock_path(run_dir(config)).unlink(missing_ok=True)  # its (released) lock file included
        (short, cpu_short), (long, cpu_long) = cpu
        return max(cpu_long - cpu_short, 1e-3) / (long - short)

    def __call__(self, candidate: Candidate, steps: int, rung: int, seed: int | None = None) -> dict[str, Any]:
        from ssl_hybrid.config import run_dir
        from ssl_hybrid.eval.backbones import load_backbone_spec

        config = self.config_for(candidate, steps, rung, seed)
        size = config.data.image_size
        result: dict[str, Any] = {}
        if self.proxy.score_init and rung == 0 and seed is None:
            torch.manual_seed(config.train.seed)
            result["init_score"] = self.sets.evaluate(build_candidate(candidate, size), size, self.proxy)["top1"]
        start, cpu_start = time.perf_counter(), time.process_time()
        check_finished(pretrain(config), config)
        result["train_seconds"] = time.perf_counter() - start
        result["train_cpu_seconds"] = time.process_time() - cpu_start  # what schedule.min_seconds budgets
        backbone, _ = load_backbone_spec(str(run_dir(config)), image_size=size)
        knn = self.sets.evaluate(backbone, size, self.proxy)
        result.update(
            score=knn["top1"],
            top5=knn["top5"],
            knn_k=knn["k"],
            image_size=size,
            seconds=time.perf_counter() - start,
            run_dir=str(run_dir(config)),
            seed=config.train.seed,
        )
        if not self.proxy.keep_checkpoints:
            shutil.rmtree(run_dir(config) / "checkpoints", ignore_errors=True)
        return result


class SearchInterrupted(KeyboardInterrupt):
    """A proxy run stopped by SIGINT/SIGTERM (it saved a checkpoint): stop the search; re-running resumes it."""


class IncompleteProxyRun(RuntimeError):
    """A proxy run that ended before its step budget (e.g. train.max_seconds): its score is not comparable."""


def check_finished(summary: dict[str, Any], config) -> None:
    """Scores only count for runs that trained every step of their rung's budget."""
    stopped, step = summary.get("stopped", "done"), summary.get("step")
    if stopped == "signal":
        raise SearchInterrupted(
            f"{config.name}: interrupted at step {step}/{config.train.steps} (checkpoint saved); "
            "re-run the same search command to resume"
        )
    if stopped != "done" or step != config.train.steps:
        raise IncompleteProxyRun(
            f"{config.name}: stopped ({stopped}) at step {step} of {config.train.steps}; "
            "proxy runs need their full step budget (is train.max_seconds set in the recipe?)"
        )


def pretrain(config) -> dict[str, Any]:
    """Run (or resume) the trainer on ``config`` in this process; returns its summary."""
    from ssl_hybrid.train.engine import pretrain as run_pretrain

    return run_pretrain(config)
