"""ssl_hybrid: self-supervised pretraining for hybrid CNN->Transformer backbones.

Importing the package registers the ``hybrid_*`` models with timm, so that
``timm.create_model("hybrid_tiny")`` works after ``import ssl_hybrid``.
"""

__version__ = "0.1.0"

from ssl_hybrid import models  # noqa: E402,F401  (registers hybrid_* with timm)
