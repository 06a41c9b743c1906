"""Online k-NN monitor: every ``train.knn_every`` steps, embed the labeled set ``data.val`` with the
current student backbone and classify every image by its k nearest *other* images (leave-one-out),
with the evaluation module's FAISS search and DINO's weighted vote, so users see whether the features
improve while training runs. Leave-one-out uses all N images as queries against N-1 neighbours, which
halves the noise of a half/half split on the small labeled sets a monitor can afford."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ssl_hybrid.config import Config

log = logging.getLogger(__name__)


class KNNMonitor:
    def __init__(self, config: Config) -> None:
        from ssl_hybrid.data.channels import stream_normalization
        from ssl_hybrid.data.labeled import check_images, load_labeled
        from ssl_hybrid.eval.features import make_loader, transform_for

        self.config = config
        channels = config.data.channels if config.data.channels != 3 else None  # the decoder the loader uses
        labeled = check_images(load_labeled(config.data.val), config.data.max_skip_rate, channels)
        if len(labeled) < 2:
            raise ValueError(f"{config.data.val}: the k-NN monitor needs at least 2 labeled images")
        size = config.eval.image_size or config.data.image_size
        norm = stream_normalization(config.data) if config.data.channels != 3 else None
        transform = transform_for({"normalization": norm.record() if norm else None}, size)
        self.loader = make_loader(
            labeled, transform, config.eval.batch_size, num_workers=min(2, config.data.num_workers)
        )
        self.corpus = config.data.val  # named in every measurement: the monitor scores this set, not data.train
        log.info(
            "online k-NN monitor scores %s (data.val): %d images (leave-one-out), %d classes",
            self.corpus,
            len(labeled),
            len(labeled.classes),
        )
        if not same_data(config.data.val, config.data.train):
            log.warning(
                "the online k-NN scores data.val=%s, not the training data (data.train=%s): it tells how the "
                "features do on that set. Set data.val to labeled images of your own data, or data.val= to "
                "turn the monitor off",
                config.data.val,
                config.data.train,
            )

    def evaluate(self, backbone, accelerator=None) -> dict[str, Any]:
        from ssl_hybrid.eval.features import extract_features, pooling_forward
        from ssl_hybrid.eval.knn import faiss_threads, leave_one_out_knn

        features, labels = extract_features(
            backbone,
            self.loader,
            accelerator,
            forward=pooling_forward(backbone, self.config.eval.pooling),
            name=f"the backbone of run {self.config.name} (online k-NN monitor)",
        )
        backbone.train()
        with faiss_threads(1):  # restores torch's thread count too: training continues on all threads
            result = leave_one_out_knn(features, labels, self.config.eval.knn_k, self.config.eval.knn_temperature)
        return dict(result, corpus=self.corpus)


def same_data(a: str, b: str) -> bool:
    """Do two data specs name the same set? Paths compare resolved (``data/pets37`` and ``./data/pets37/``)."""
    if a == b:
        return True
    local = all(s and "://" not in s and not s.startswith("pipe:") and "{" not in s for s in (a, b))
    return local and Path(a).resolve() == Path(b).resolve()
