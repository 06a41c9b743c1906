"""ssl_hybrid: self-supervised pretraining for hybrid CNN->Transformer backbones.

Importing the package itself is light (no torch, no timm), so ``ssl-hybrid --help`` starts at once.
``import ssl_hybrid.models`` registers the ``hybrid_*`` and ``resvit_*`` models with timm, so that
``timm.create_model("hybrid_tiny")`` works after it.
"""

__version__ = "0.1.0"
