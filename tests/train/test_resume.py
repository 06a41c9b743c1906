"""Exact resume: N steps straight == (k steps, kill -9, resume, N-k steps), bit for bit; SIGTERM saves
a checkpoint and exits cleanly. Each test starts the uninterrupted run in parallel with the other."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from trainhelpers import run_pretrain, start_pretrain, tiny_overrides, wait_pretrain
from ssl_hybrid.train.checkpoint import list_checkpoints


def final_checkpoint(run_dir):
    newest = list_checkpoints(run_dir)[-1]
    assert newest.name == "step_00000004"
    return load_file(str(newest / "model.safetensors")), torch.load(newest / "state.pt", weights_only=True)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_minus_9_and_resume_is_bitwise_identical(corpus, run_root, workers):
    straight = start_pretrain(tiny_overrides(run_root, "straight", data__num_workers=workers))
    killed = tiny_overrides(run_root, "killed", data__num_workers=workers)
    code, err = run_pretrain(killed, {"SSL_HYBRID_KILL_AT_STEP": "3"}, check=False)
    assert code == -signal.SIGKILL, err[-2000:]
    assert [p.name for p in list_checkpoints(run_root / "killed")] == ["step_00000002"]
    run_pretrain(killed)  # the same command again resumes from step 2
    wait_pretrain(straight)
    weights_a, state_a = final_checkpoint(run_root / "straight")
    weights_b, state_b = final_checkpoint(run_root / "killed")
    assert_identical(weights_a, weights_b)  # student, heads, EMA teacher, DINO center
    assert state_a["counters"] == state_b["counters"]
    for key, value in state_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], state_b["optimizer"]["state"][key]["exp_avg_sq"])
    assert (run_root / "killed" / "backbone.safetensors").exists()


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes_identically(corpus, run_root):
    straight = start_pretrain(tiny_overrides(run_root, "straight"))
    overrides = tiny_overrides(run_root, "term")
    proc = start_pretrain(overrides, quiet=False)
    metrics = run_root / "term" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().strip():  # the loop (and its handler) is running
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, err = wait_pretrain(proc, check=False)
    assert code == 0, err[-2000:]
    saved = list_checkpoints(run_root / "term")
    assert saved, err[-2000:]
    if saved[-1].name != "step_00000004":  # the signal landed before the last step
        assert "SIGTERM received" in err and "re-run the same command to resume" in err
        assert not (run_root / "term" / "backbone.safetensors").exists()
    run_pretrain(overrides)
    wait_pretrain(straight)
    assert_identical(final_checkpoint(run_root / "straight")[0], final_checkpoint(run_root / "term")[0])
