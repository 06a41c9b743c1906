"""Online k-NN monitor: every ``train.knn_every`` steps, embed the labeled set ``data.val`` with the
current student backbone and run the evaluation module's FAISS k-NN (DINO protocol) from one half of
each class to the other, so users see whether the features improve while training runs."""

from __future__ import annotations

import logging
from typing import Any


from ssl_hybrid.config import Config

log = logging.getLogger(__name__)

# Half of each class is the bank, half the queries: small labeled sets still get a usable estimate.
HOLDOUT_FRACTION = 0.5


class KNNMonitor:
    def __init__(self, config: Config) -> None:
        from ssl_hybrid.data.labeled import load_labeled, stratified_holdout
        from ssl_hybrid.eval.features import eval_transform, make_loader

        self.config = config
        labeled = load_labeled(config.data.val)
        self.labels = labeled.labels
        self.bank, self.queries = stratified_holdout(self.labels, HOLDOUT_FRACTION, config.train.seed)
        if len(self.queries) == 0:
            raise ValueError(f"{config.data.val}: the k-NN monitor needs classes with at least 2 images")
        size = config.eval.image_size or config.data.image_size
        self.loader = make_loader(labeled, eval_transform(size), config.eval.batch_size,
                                  num_workers=min(2, config.data.num_workers))
        log.info("online k-NN monitor on %s: %d bank / %d query images, %d classes", config.data.val,
                 len(self.bank), len(self.queries), len(labeled.classes))

    def evaluate(self, backbone, accelerator=None) -> dict[str, Any]:
        from ssl_hybrid.eval.features import extract_features
        from ssl_hybrid.eval.knn import knn_evaluate

        features, labels = extract_features(backbone, self.loader, accelerator)
        backbone.train()
        result = knn_evaluate(features[self.bank], labels[self.bank], features[self.queries],
                              labels[self.queries], ks=(self.config.eval.knn_k,),
                              temperature=self.config.eval.knn_temperature, headline_k=self.config.eval.knn_k,
                              threads=1)
        return {k: result[k] for k in ("top1", "top5", "k", "n_train", "n_test")}


__all__ = ["KNNMonitor"]
