"""A stop signal at every phase of a job, not only mid-training: during setup, the step-0 k-NN monitor and
the final checkpoint (before the export). Launchers send SIGTERM whenever they preempt, and kill soon after
(torchrun: 30 s), so each phase must end the job cleanly: exit 0, one line saying where it stopped, no
traceback, no half-written file, and the same command afterwards completes the run (checked where the
interrupted run had saved something: the final checkpoint without its export).

The signal is raised in this process at a chosen point (deterministic; the process-group case, with data
workers, is the SIGTERM test in test_resume.py). The test installs its own SIGTERM handler first, so code
that leaves the signal to the default action fails the test instead of killing pytest."""

from __future__ import annotations

import signal

import pytest

from ssl_hybrid.cli import main
from ssl_hybrid.train import engine, wiring
from ssl_hybrid.train.checkpoint import list_checkpoints, step_dir_name
from tests.train.trainhelpers import tiny_overrides

STEPS = 2


class SignalLeftToDefault(Exception):
    """The job did not take SIGTERM over: a launcher's SIGTERM would have killed it on the spot."""


@pytest.fixture
def test_sigterm_handler():
    def handler(signum, frame):
        raise SignalLeftToDefault(f"{signal.Signals(signum).name} reached the default handler")

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def sigterm_before(monkeypatch, module, name: str, when=lambda *args: True) -> None:
    """SIGTERM this process as ``module.<name>`` starts (the first call for which ``when(*args)`` is true)."""
    original = getattr(module, name)
    sent = []

    def wrapped(*args, **kwargs):
        if not sent and when(*args):
            sent.append(name)
            signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


PHASES = {  # phase -> (module and function the signal arrives in, which call, the step the run stops at)
    "setup": (wiring, "build_monitor", lambda *a: True, 0),
    "step-0 monitor": (engine, "run_monitor", lambda run: run.counters.step == 0, 0),
    "final checkpoint": (engine, "save", lambda run: run.counters.step == STEPS, STEPS),
}


@pytest.mark.fault(injected="SIGTERM during setup, during the step-0 k-NN monitor, or while the final checkpoint is "
                            "written (before the export)",
                   did="the phase completes, then exit 0 with one line 'stopped by signal at step N'; no export "
                       "yet; the same command afterwards completes (and exports) the run",
                   lost="nothing: the final checkpoint is complete, earlier phases had nothing new to save")
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.slow
def test_sigterm_in_every_phase_exits_0_and_the_same_command_completes(corpus, run_root, image_folder, capsys,
                                                                     monkeypatch, test_sigterm_handler, phase):
    overrides = tiny_overrides(run_root, "phase", train__steps=STEPS, train__checkpoint_every=0,
                               train__knn_every=STEPS, data__val=image_folder)
    module, name, when, stopped_at = PHASES[phase]
    sigterm_before(monkeypatch, module, name, when)
    code = main(["pretrain", *overrides])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "Traceback" not in err
    assert f"stopped by signal at step {stopped_at}" in err, err[-2000:]
    run_dir = run_root / "phase"
    assert [p.name for p in list_checkpoints(run_dir)] == ([step_dir_name(STEPS)] if stopped_at else [])
    assert not (run_dir / "model").exists()
    assert not [p.name for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    if not stopped_at:
        return  # nothing was trained: the next run is an ordinary first run
    code = main(["-q", "pretrain", *overrides])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (run_dir / "model" / "model.safetensors").exists()
    assert [p.name for p in list_checkpoints(run_dir)][-1] == step_dir_name(STEPS)
