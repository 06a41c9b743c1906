"""Writes ``legacy_layout.json`` and ``legacy_*.safetensors``: what the two model classes that existed before the
one family (``HybridViT`` and ``ResViT`` as separate classes, commit 8bf7528) saved and computed. Kept to show how
the fixture was made; run it on that commit only (``git worktree add /tmp/old 8bf7528``, then
``PYTHONPATH=/tmp/old python tests/models/data/make_legacy_fixture.py tests/models/data``).

* the state-dict layout (key -> shape) of every registered preset, and
* for one small model per conv-stage kind, a randomized state dict (buffers too) with its outputs on fixed
  inputs, so the new presets must load it strictly and compute the same.
"""

import json
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import ssl_hybrid.models  # noqa: F401
from ssl_hybrid.models import HYBRID_VARIANTS, RESVIT_VARIANTS
from ssl_hybrid.models.masking import random_grid_mask

SMALL = {
    "resvit_nano": dict(stem_dim=8, conv_dims=(8, 8, 16), embed_dim=16, depth=2, num_heads=2),
    "hybrid_nano": dict(conv_dims=(8, 16), embed_dim=16, depth=4, num_heads=2),
}


def outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = random_grid_mask(2, 4, 4, 0.5, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        out = {"features": model.forward_features(x), "multiscale": model.forward_multiscale(x),
               "masked_fused": model.forward_masked(x, mask)["fused"], "input": x, "mask": mask.to(torch.uint8)}
        model.train()
        out["train_features"] = model.forward_features(x)
    return out


def main(folder: Path) -> None:
    layout = {}
    for name in HYBRID_VARIANTS + RESVIT_VARIANTS:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0)
        layout[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    (folder / "legacy_layout.json").write_text(json.dumps(layout, indent=0, sort_keys=True))
    for name, kwargs in SMALL.items():
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=3, **kwargs)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point():
                    value.copy_(torch.rand(value.shape, generator=generator) * 0.5 + (0.5 if "running_var" in key else -0.1))
        state = {f"state.{k}": v.clone() for k, v in model.state_dict().items()}
        state.update({f"out.{k}": v.contiguous() for k, v in outputs(model).items()})
        save_file(state, str(folder / f"legacy_{name}.safetensors"), metadata={"kwargs": json.dumps(kwargs)})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
