"""The default model's preset with token selection and sparse attention through the trainer: a few pretraining
steps, then an exact resume (issue 30: these options used to be dropped for ``resvit_*``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from ssl_hybrid.config import load_config
from ssl_hybrid.train import engine, wiring
from ssl_hybrid.train.checkpoint import list_checkpoints, step_dir_name
from tests.train.trainhelpers import tiny_overrides

FEATURES = {"model__name": "resvit_nano", "model__token_keep_rate": 0.7, "model__attn_mode": "window",
            "model__arch.window_size": 1, "train__keep_checkpoints": 4}


def _final(run_dir):
    newest = list_checkpoints(run_dir)[-1]
    assert newest.name == step_dir_name(4)
    return load_file(str(newest / "model.safetensors")), torch.load(newest / "state.pt", weights_only=True)


@pytest.mark.slow  # two in-process pretraining runs: seconds on an idle machine
def test_resvit_with_token_selection_and_window_attention_resumes_exactly(corpus, run_root):
    config = load_config(None, tiny_overrides(run_root, "straight", **FEATURES))
    backbone = wiring.build_backbone(config)
    assert backbone.token_select.keep_rate == 0.7 and {b.attn.attn_mode for b in backbone.blocks} == {"window"}
    engine.pretrain(config)
    straight = run_root / "straight"
    resumed = run_root / "resumed"
    shutil.copytree(straight, resumed)
    for later in [d for d in list_checkpoints(resumed) if d.name != step_dir_name(2)]:
        shutil.rmtree(later)  # as if the run had been killed right after its step-2 checkpoint
    shutil.rmtree(resumed / "model", ignore_errors=True)
    assert engine.pretrain(load_config(None, tiny_overrides(run_root, "resumed", **FEATURES)))["step"] == 4
    (weights_a, state_a), (weights_b, state_b) = _final(straight), _final(resumed)
    assert weights_a.keys() == weights_b.keys()
    assert [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])] == []
    assert state_a["counters"] == state_b["counters"]
    for key, value in state_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], state_b["optimizer"]["state"][key]["exp_avg_sq"]), key
