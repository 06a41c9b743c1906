"""Data stage: shard writer (``shards``), training stream (``stream``), multi-view augmentations
(``views``), labeled sets (``labeled``) and the data benchmark (``bench``).

Nothing heavy is imported here (the CLI imports ``ssl_hybrid.data.bench`` to build its parser);
the main entry points are re-exported lazily.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "write_shards": "ssl_hybrid.data.shards",
    "build_train_stream": "ssl_hybrid.data.stream",
    "resolve_shards": "ssl_hybrid.data.sources",
    "decode_image": "ssl_hybrid.data.stream",
    "TrainStream": "ssl_hybrid.data.stream",
    "build_transform": "ssl_hybrid.data.views",
    "collate_views": "ssl_hybrid.data.views",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssl_hybrid.data' has no attribute {name!r}")
