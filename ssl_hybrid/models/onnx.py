"""ONNX export of a backbone or a classifier (any timm model, ours included) with dynamic batch and image size.

The graph is ``model(image)``: the pooled embedding ``[B, D]`` of a backbone built with ``num_classes=0``, the
logits ``[B, classes]`` of a classifier. Batch, height and width are dynamic axes; our models resample their
position embedding to the input's grid inside the graph (``contract.resample_traced``), so one file serves
every image size that is a multiple of 16.

The TorchScript exporter (``dynamo=False``) is used: the torch.export-based one needs ``onnxscript``, a further
dependency, for the same graph. Needs the ``onnx`` extra (``pip install 'ssl-hybrid[onnx]'``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ssl_hybrid.errors import UserError

INPUT_NAME = "image"
OPSET = 18  # the first whose Resize has antialias (the position embedding's resampling)


def output_name(model: nn.Module) -> str:
    return "logits" if getattr(model, "num_classes", 0) else "embedding"


def export_onnx(model: nn.Module, path: str | Path, image_size: int, in_chans: int = 3) -> Path:
    """Write ``model``'s forward to ``path`` as ONNX (checked by ``onnx.checker``); returns ``path``.

    ``image_size`` is the side of the example input the graph is traced with; the graph takes any batch
    and size. The file appears complete or not at all (written next to ``path``, then renamed).
    """
    from timm.utils.onnx import onnx_export

    require_onnx()
    select = getattr(model, "token_select", None)
    if select is not None and select.enabled:
        raise ValueError(
            "token selection keeps a data-dependent number of tokens, which a traced graph cannot; "
            "export with model.set_token_selection(1.0) (same weights)"
        )
    register_antialiased_bicubic()
    from ssl_hybrid.runs import atomic_path

    path = Path(path)
    was_training = model.training
    example = torch.randn(2, in_chans, image_size, image_size)  # batch 2: a batch of 1 could be specialised
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            # the size checks (multiple of 16) read traced shapes as Python values; they validate, not compute
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            onnx_export(
                model,
                str(tmp),
                example_input=example,
                dynamic_size=True,
                use_dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[output_name(model)],
                opset=OPSET,
                check=True,
            )
    finally:
        model.train(was_training)
    return path


def export_saved_onnx(folder: str | Path, name: str = "model.onnx") -> Path:
    """The model folder's model as saved (a backbone, or a fine-tuned classifier with its head) as ``name`` in
    the folder, traced at the input size its ``pretrained_cfg`` records (batch and image size stay dynamic)."""
    from ssl_hybrid.models.export import load_model

    require_onnx()
    model, config = load_model(folder)
    channels, _, size = (config.get("pretrained_cfg") or {}).get("input_size") or [3, 224, 224]
    return export_onnx(model, Path(folder) / name, int(size), int(channels))


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as err:
        raise UserError(f"ONNX export needs the onnx package ({err}): pip install 'ssl-hybrid[onnx]'") from err


def register_antialiased_bicubic() -> None:
    """Teach the TorchScript exporter ``F.interpolate(mode="bicubic", antialias=True)`` (timm's position-embedding
    resampler), which it lacks: ONNX Resize with antialias, PIL's cubic (a = -0.5) and out-of-image taps
    excluded and the rest renormalised is the same filter (onnxruntime matches torch to ~1e-6)."""
    from torch.onnx import symbolic_helper as helper

    def resize(g, image, output_size, align_corners, scales_h=None, scales_w=None):
        batch_channels = helper._slice_helper(g, g.op("Shape", image), axes=[0], starts=[0], ends=[2])
        sizes = g.op("Concat", batch_channels, g.op("Cast", output_size, to_i=7), axis_i=0)  # 7: INT64
        mode = "align_corners" if helper._maybe_get_const(align_corners, "b") else "half_pixel"
        none = helper._optional_input_placeholder_tensor(g)
        return g.op(
            "Resize",
            image,
            none,
            none,
            sizes,
            mode_s="cubic",
            cubic_coeff_a_f=-0.5,
            antialias_i=1,
            exclude_outside_i=1,
            coordinate_transformation_mode_s=mode,
        )

    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", resize, OPSET)
