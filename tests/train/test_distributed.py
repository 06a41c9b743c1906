"""Two gloo processes on CPU (torchrun): gradients equal one process on the concatenated batch for the
contrastive loss (negatives gathered with gradients), and the trainer's ranks see disjoint data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.trainhelpers import REPO, tiny_overrides

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def torchrun(script: Path, *args: str, port: int, timeout: float = 60) -> None:
    """Two CPU processes on ``script``; ``port`` comes from the ``free_port`` fixture (tests/conftest.py)."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.fault(injected="a DDP-wrapped model still referenced when the process group is destroyed (a module "
                            "global), so gloo's threads met interpreter finalization: a rank aborted with "
                            "'terminate called without an active exception' on a loaded machine",
                   did="every rank releases the wrappers and collects before destroying the group "
                       "(ssl_hybrid.distributed.end_distributed, the trainer's teardown too) and asserts that no gloo "
                       "thread is left at exit",
                   lost="nothing")
def test_two_processes_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path, free_port):
    from dist_model import build_model, make_batch

    torchrun(DIST / "contrastive_grads.py", str(tmp_path / "grads.pt"), port=free_port)
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)
    model = build_model()  # one process, no process group: plain in-batch negatives over all 8 images
    view0, view1 = make_batch()
    model(view0, view1).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(distributed[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Without the gradient-carrying gather the per-rank losses would give different gradients:
    half = build_model()
    half(view0[:4], view1[:4]).backward()
    assert (half.backbone[0].weight.grad - model.backbone[0].weight.grad).abs().max() > 1e-3


def test_trainer_ranks_see_disjoint_data(run_root, corpus, free_port):
    overrides = tiny_overrides(run_root, "ddp", data__resampled="false", train__steps=3, train__batch_size=8,
                               train__checkpoint_every=0)
    torchrun(DIST / "pretrain_keys.py", str(run_root), *overrides, port=free_port, timeout=90)
    ranks = [json.loads((run_root / f"keys_rank{r}.json").read_text()) for r in (0, 1)]
    keys0, keys1 = (set(r["keys"]) for r in ranks)
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 3 * 4  # same number of batches per rank
    assert keys0 and keys1 and not keys0 & keys1
    step_dir = run_root / "ddp" / "checkpoints" / "step_00000003"
    assert (step_dir / "rank_0.pt").exists() and (step_dir / "rank_1.pt").exists()
    assert ranks[0]["summary"]["step"] == 3
