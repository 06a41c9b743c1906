"""ONNX export (ssl_hybrid.models.onnx): one graph with dynamic batch and image size gives, in onnxruntime,
what the torch model gives, at the traced size and at another one, for both model families."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# onnxruntime's telemetry (on by default) writes a session file into $TMPDIR; the variable is read at its start
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ssl_hybrid.models.factory import create_backbone  # noqa: E402
from ssl_hybrid.models.onnx import export_onnx  # noqa: E402

MAX_ABS_DIFF = 1e-4  # fp32; measured about 1.3e-6 (embeddings) and 2e-7 (logits)
TRACED = 64  # the example input's side; the graph is also run at RUN_AT, where the position embedding is resampled
RUN_AT = ((2, 64), (3, 96), (2, 32))  # (batch, side): the traced size, one larger (upsampled), one smaller


def runtime_matches_torch(model: torch.nn.Module, path) -> float:
    """Largest |onnxruntime - torch| over RUN_AT; checks the graph's dynamic axes and output shapes too."""
    graph = onnx.load(str(path)).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for batch, side in RUN_AT:
        images = torch.randn(batch, 3, side, side, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"image": images.numpy()})[0]
        assert got.shape == expected.shape
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def with_loud_position_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves pos_embed near 0 (std 0.02): make it unit-size so a wrong resampling shows."""
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.mark.parametrize("name", ["resvit_nano", "hybrid_nano"])
def test_onnx_graph_matches_torch_at_two_resolutions(tmp_path, name):
    model = with_loud_position_embedding(create_backbone(name, TRACED))
    model.train()  # export traces the eval forward and gives the model back as it was
    path = export_onnx(model, tmp_path / "model.onnx", TRACED)
    assert model.training and path.exists() and not list(tmp_path.glob(".*.tmp"))
    assert onnx.load(str(path)).graph.output[0].name == "embedding"
    assert runtime_matches_torch(model.eval(), path) < MAX_ABS_DIFF


def test_export_onnx_flag_writes_a_classifier_graph_next_to_the_export(tmp_path, monkeypatch, capsys):
    from ssl_hybrid.cli import main
    from ssl_hybrid.models.export import save_model_folder
    from ssl_hybrid.train import export as train_export

    model = with_loud_position_embedding(create_backbone("hybrid_nano", TRACED, num_classes=5))  # with a head

    def exported(checkpoint, out_dir, force=False):  # the checkpoint export itself is tested with the trainer
        return save_model_folder(model, out_dir, label_names=list("abcde"), extra={"step": 1}, force=force)

    monkeypatch.setattr(train_export, "export_checkpoint", exported)
    assert main(["export", str(tmp_path / "run"), "--out-dir", str(tmp_path / "out"), "--onnx"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "out" / "model.onnx"))
    assert onnx.load(str(tmp_path / "out" / "model.onnx")).graph.output[0].name == "logits"
    assert runtime_matches_torch(model, tmp_path / "out" / "model.onnx") < MAX_ABS_DIFF
