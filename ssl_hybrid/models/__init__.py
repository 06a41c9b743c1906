"""Backbones. Importing this package registers the ``hybrid_*`` variants with timm.

Depends on timm/torch only (never on ssl_hybrid.data/train/eval/objectives).
"""

from ssl_hybrid.models.export import load_backbone, load_model, save_model_folder  # noqa: F401
from ssl_hybrid.models.flops import count_flops  # noqa: F401
from ssl_hybrid.models.hybrid import HybridViT, hybrid_base, hybrid_nano, hybrid_small, hybrid_tiny  # noqa: F401
from ssl_hybrid.models.masking import random_grid_mask  # noqa: F401
from ssl_hybrid.models.resvit import ResViT, resvit_base, resvit_nano, resvit_small, resvit_tiny  # noqa: F401

HYBRID_VARIANTS = ("hybrid_nano", "hybrid_tiny", "hybrid_small", "hybrid_base")
# The conv-heavy family: batch-normed ResNet stages carry the compute, a few ViT blocks add global context.
RESVIT_VARIANTS = ("resvit_nano", "resvit_tiny", "resvit_small", "resvit_base")
