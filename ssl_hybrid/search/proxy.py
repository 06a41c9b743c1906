"""The trained proxy score: a short pretraining run of the candidate, then DINO-protocol k-NN top-1 of
its frozen features on a small labeled set.

Each (candidate, rung) trains in its own run directory ``<search>/runs/<id>-r<rung>`` through the same
trainer entry point as ``ssl-hybrid pretrain`` (so a proxy run is exactly a recipe run with fewer steps),
and the exported backbone is loaded back with the evaluators' loader. The trainer resumes a run
directory from its newest checkpoint, so an interrupted proxy run continues instead of starting over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ssl_hybrid.errors import UserError
from ssl_hybrid.search.recipe import candidate_config
from ssl_hybrid.search.space import Candidate

log = logging.getLogger(__name__)


@dataclass
class ProxyConfig:
    """How each candidate is scored (used by the trained proxy; ignored with an injected scorer)."""

    # Base pretraining recipe (data, objective, optimizer); "" = the defaults.
    recipe: str = ""
    # key=value overrides for every proxy run, applied after the candidate's model group (e.g. data.train=...).
    overrides: list = field(default_factory=list)
    # Labeled image folder (or labeled shards) whose images form the k-NN bank.
    knn_train: str = ""
    # Labeled queries; "" = a stratified 25% hold-out of knn_train.
    knn_test: str = ""
    # Labeled images per class in the bank (0 = all of knn_train): few labels is the regime we care about.
    knn_shots: int = 0
    # DINO's k-NN protocol: k=20, T=0.07.
    knn_k: int = 20
    knn_temperature: float = 0.07
    # Seed for the bank's k-shot draw and the hold-out split.
    seed: int = 0

    def check(self) -> None:
        if not self.knn_train:
            raise UserError("search.proxy.knn_train: name a labeled image folder for the k-NN score "
                            "(class sub-folders), e.g. proxy.knn_train=/data/flowers/train")
        if self.knn_shots < 0 or self.knn_k < 1:
            raise UserError("search.proxy.knn_shots must be >= 0 and search.proxy.knn_k >= 1")


class KnnSets:
    """The labeled bank and query sets, loaded and split once per search."""

    def __init__(self, proxy: ProxyConfig):
        from ssl_hybrid.data.labeled import kshot_indices, load_labeled, stratified_holdout

        proxy.check()
        train = load_labeled(proxy.knn_train)
        if proxy.knn_test:
            test = load_labeled(proxy.knn_test)
        else:
            bank_idx, query_idx = stratified_holdout(train.labels, 0.25, proxy.seed)
            train, test = train.subset(bank_idx), train.subset(query_idx)
        if proxy.knn_shots:
            train = train.subset(kshot_indices(train.labels, proxy.knn_shots, proxy.seed))
        self.train, self.test = train, test
        self.num_classes = len(train.classes)
        log.info("k-NN proxy: bank %d images, %d queries, %d classes", len(train), len(test), self.num_classes)

    def sample_images(self, count: int, image_size: int, seed: int):
        """A fixed batch of bank images [count, 3, S, S] under the eval transform (for the zero-cost proxy)."""
        import torch

        from ssl_hybrid.eval.features import eval_transform

        transform = eval_transform(image_size)
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(self.train), size=min(count, len(self.train)), replace=False)
        return torch.stack([transform(self.train.load_image(int(i))) for i in picks])


class PretrainKnnProxy:
    """scorer(candidate, steps, rung) -> {"score": k-NN top-1, ...} via a real pretraining run."""

    def __init__(self, proxy: ProxyConfig, work_dir: Path, sets: Optional[KnnSets] = None):
        from ssl_hybrid.search.recipe import read_recipe

        self.proxy = proxy
        self.work_dir = Path(work_dir)
        self.base = read_recipe(proxy.recipe)
        self.sets = sets or KnnSets(proxy)

    def config_for(self, candidate: Candidate, steps: int, rung: int):
        name = f"{candidate.id}-r{rung}"
        overrides = [*self.proxy.overrides, f"train.steps={steps}", f"train.output_dir={self.work_dir / 'runs'}"]
        return candidate_config(self.base, candidate, overrides, self.work_dir / "recipes", name)

    def __call__(self, candidate: Candidate, steps: int, rung: int) -> dict[str, Any]:
        from ssl_hybrid.config import run_dir

        config = self.config_for(candidate, steps, rung)
        start = time.perf_counter()
        pretrain(config)
        train_seconds = time.perf_counter() - start
        knn = self.knn(run_dir(config), config.data.image_size)
        return {"score": knn["top1"], "top5": knn["top5"], "knn_k": knn["k"], "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - start - train_seconds, "run_dir": str(run_dir(config))}

    def knn(self, run: Path, image_size: int) -> dict[str, Any]:
        from ssl_hybrid.eval.backbones import load_backbone_spec
        from ssl_hybrid.eval.features import cached_features
        from ssl_hybrid.eval.knn import knn_evaluate

        model, meta = load_backbone_spec(str(run), image_size=image_size)
        train = cached_features(model, meta, self.sets.train, image_size, cache_dir=None)
        test = cached_features(model, meta, self.sets.test, image_size, cache_dir=None)
        return knn_evaluate(*train, *test, ks=(self.proxy.knn_k,), headline_k=self.proxy.knn_k,
                            temperature=self.proxy.knn_temperature, num_classes=self.sets.num_classes)


def pretrain(config) -> Path:
    """Run the trainer on ``config`` (in this process) and return its run directory."""
    from ssl_hybrid.train.loop import pretrain as run_pretrain

    return run_pretrain(config)
