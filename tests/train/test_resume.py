"""Exact resume as users run it: N steps straight == (SIGKILL or SIGTERM from outside mid-run, the same
command again), bit for bit, at one thread and at the machine's default thread count, with the online
k-NN monitor on (its faiss search once changed torch's thread count for the rest of a run: the straight
run trained on 1 thread after the step-0 monitor, the resumed one on all cores). Each uninterrupted
reference run starts in the background once per (threads, workers) and is shared by the tests."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ssl_hybrid.train.checkpoint import list_checkpoints, step_dir_name
from tests.train.trainhelpers import signal_when, start_pretrain, tiny_overrides, wait_pretrain

STEPS = 8
THREADS = [pytest.param("1", id="1-thread"), pytest.param(None, id="default-threads")]


def resume_overrides(run_root: Path, name: str, val: Path, workers: int) -> list[str]:
    # The monitor runs at steps 0 and 4 of the straight run; an interrupted one resumes after step 4.
    return tiny_overrides(run_root, name, data__num_workers=workers, data__val=val, train__steps=STEPS,
                          train__checkpoint_every=2, train__knn_every=4, train__keep_checkpoints=8)


@pytest.fixture(scope="module")
def monitor_val(tmp_path_factory) -> Path:
    """A small labeled folder for the k-NN monitor (3 classes x 4 images)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(3)
    for label in range(3):
        (root / f"class{label}").mkdir()
        for index in range(4):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{label}" / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def straight(tmp_path_factory, monitor_val):
    """straight(threads, workers) -> the run directory of the finished uninterrupted run."""
    root = tmp_path_factory.mktemp("straight")
    procs: dict = {}
    done: dict = {}

    def start(threads, workers):
        key = (threads, workers)
        if key not in procs:
            name = f"straight-{threads or 'default'}-{workers}"
            procs[key] = (start_pretrain(resume_overrides(root, name, monitor_val, workers), threads=threads),
                          root / name)
        return key

    def finished(threads, workers) -> Path:
        key = start(threads, workers)
        if key not in done:
            wait_pretrain(procs[key][0])
            done[key] = procs[key][1]
        return done[key]

    finished.start = start
    yield finished
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def final_state(run_dir: Path):
    newest = list_checkpoints(run_dir)[-1]
    assert newest.name == step_dir_name(STEPS)
    return (load_file(str(newest / "model.safetensors")), torch.load(newest / "state.pt", weights_only=True),
            torch.load(newest / "rank_0.pt", weights_only=True))


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Weights (student, heads, EMA teacher, DINO center), optimizer moments, counters, RNG states and data
    position of the final checkpoints are identical."""
    weights_a, state_a, rank_a = final_state(reference)
    weights_b, state_b, rank_b = final_state(resumed)
    assert weights_a.keys() == weights_b.keys()
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    worst = max((float((weights_a[k] - weights_b[k]).abs().max()) for k in different), default=0.0)
    assert not different, f"{len(different)} of {len(weights_a)} tensors differ (max |dw| {worst:.3g}): {different[:3]}"
    assert state_a["counters"] == state_b["counters"]
    for key, value in state_a["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(value[moment], state_b["optimizer"]["state"][key][moment]), (key, moment)
    assert torch.equal(rank_a["rng"]["torch"], rank_b["rng"]["torch"])
    assert rank_a["stream"] == rank_b["stream"]
    assert (resumed / "model" / "model.safetensors").exists()


@pytest.mark.fault(injected="SIGKILL from outside after the step-4 checkpoint (1 thread and default threads; 0 and"
                            " 2 data workers; k-NN monitor on)",
                   did="the same command resumes from the newest complete checkpoint",
                   lost="nothing: final weights, optimizer, RNG and data position bit-identical to an "
                        "uninterrupted run")
@pytest.mark.slow
# A covering pair rather than the cross product (the suite's time budget): each thread setting and each worker
# setting is killed once; the SIGTERM test below adds 1 thread with 2 workers.
@pytest.mark.parametrize("threads, workers", [pytest.param("1", 0, id="1-thread-0"),
                                              pytest.param(None, 2, id="default-threads-2")])
def test_sigkill_mid_run_then_resume_is_bitwise_identical(corpus, run_root, straight, monitor_val, threads, workers):
    straight.start(threads, workers)
    overrides = resume_overrides(run_root, "killed", monitor_val, workers)
    proc = start_pretrain(overrides, threads=threads)
    signal_when(proc, run_root / "killed" / "checkpoints" / step_dir_name(4), signal.SIGKILL)
    code, err = wait_pretrain(proc, check=False)
    assert code == -signal.SIGKILL, err[-2000:]
    saved = [p.name for p in list_checkpoints(run_root / "killed")]
    assert step_dir_name(4) in saved and step_dir_name(STEPS) not in saved
    assert not (run_root / "killed" / "model").exists()
    code, err = wait_pretrain(start_pretrain(overrides, threads=threads, quiet=False))
    assert "resumed from" in err, err[-2000:]
    assert_same_run(straight(threads, workers), run_root / "killed")


@pytest.mark.fault(injected="SIGTERM to the run's whole process group mid-run, 2 data workers included, as torchrun, "
                            "SLURM, systemd and timeout send it (1 thread and default threads)",
                   did="the workers ignore it; the trainer checkpoints at the end of the current step and exits 0 "
                       "without a traceback, no export; the same command resumes",
                   lost="nothing: bit-identical to an uninterrupted run")
@pytest.mark.slow
@pytest.mark.parametrize("threads", THREADS)
def test_sigterm_mid_run_saves_exits_cleanly_and_resumes_identically(corpus, run_root, straight, monitor_val,
                                                                     threads):
    straight.start(threads, 2)
    overrides = resume_overrides(run_root, "term", monitor_val, 2)
    proc = start_pretrain(overrides, quiet=False, threads=threads, new_session=True)
    signal_when(proc, run_root / "term" / "checkpoints" / step_dir_name(2), signal.SIGTERM, group=True)
    code, err = wait_pretrain(proc, check=False)
    assert code == 0, err[-2000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-2000:]
    stopped_at = int(list_checkpoints(run_root / "term")[-1].name[5:])
    assert 2 <= stopped_at < STEPS, err[-2000:]
    assert "SIGTERM received" in err and "re-run the same command to resume" in err
    assert not (run_root / "term" / "model").exists()
    wait_pretrain(start_pretrain(overrides, threads=threads))
    assert_same_run(straight(threads, 2), run_root / "term")


@pytest.mark.fault(injected="SIGKILL after the step-4 checkpoint of a run with data.augment_on=device (the photometric "
                            "augmentations batched in the trainer, DINO views: jitter, blur, solarize)",
                   did="the augmentation draws are a function of (seed, step, rank), so the resumed steps draw "
                       "what the killed ones would have",
                   lost="nothing: bit-identical to an uninterrupted run")
@pytest.mark.slow
def test_device_augmentation_resumes_bitwise_identical(corpus, run_root, monitor_val):
    def overrides(name: str) -> list[str]:
        return resume_overrides(run_root, name, monitor_val, 2) + ["data.augment_on=device"]

    reference = start_pretrain(overrides("device-straight"), threads="1")
    proc = start_pretrain(overrides("device-killed"), threads="1")
    signal_when(proc, run_root / "device-killed" / "checkpoints" / step_dir_name(4), signal.SIGKILL)
    code, err = wait_pretrain(proc, check=False)
    assert code == -signal.SIGKILL, err[-2000:]
    code, err = wait_pretrain(start_pretrain(overrides("device-killed"), threads="1", quiet=False))
    assert "resumed from" in err, err[-2000:]
    wait_pretrain(reference)
    assert_same_run(run_root / "device-straight", run_root / "device-killed")
