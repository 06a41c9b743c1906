"""The pretraining progress bar's time-left estimate: start-up excluded, the time budget respected."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest


def _seconds(text: str) -> float:
    """'07:34' / '1:02:03' (tqdm's format_interval) -> seconds."""
    parts = [int(p) for p in text.split(":")]
    return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


def _left(bar) -> str:
    return re.search(r"<([^,\]]+)", str(bar)).group(1).strip()


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock, set by hand: each step takes exactly what the test says."""
    import tqdm.std

    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    return now


def _bar(steps: int, max_seconds: float):
    from ssl_hybrid.train.engine import make_bar

    settings = SimpleNamespace(name="quickstart", steps=steps, max_seconds=max_seconds)
    run = SimpleNamespace(settings=settings, accelerator=SimpleNamespace(is_main_process=True),
                          counters=SimpleNamespace(step=0))
    return make_bar(run)


@pytest.mark.fault(injected="a first step 20x slower than the rest (data workers starting, first forward), 8-min budget",
                   did="the bar shows '?' until a step after the start-up is timed, then at most the budget left "
                       "(marked '(time budget)')",
                   lost="nothing; before, the first estimate of the 8-minute run read 2 h 39 min")
def test_first_estimate_excludes_start_up_and_respects_the_budget(clock):
    bar = _bar(400, 480.0)
    clock[0] += 24.0  # the start-up step
    bar.update(1)
    assert _left(bar) == "?"
    clock[0] += 1.2
    bar.update(1)
    assert _left(bar) == "07:34 (time budget)"  # 480 s - 25.2 s spent, not 398 x 1.2 s, not 398 x 24 s
    for _ in range(10):
        clock[0] += 1.2
        bar.update(1)
    assert _seconds(_left(bar).split()[0]) == pytest.approx(480 - 25.2 - 12, abs=1)
    bar.close()


def test_without_a_budget_the_estimate_is_steps_left_times_the_step_time(clock):
    bar = _bar(40, 0.0)
    clock[0] += 30.0
    bar.update(1)
    for _ in range(4):
        clock[0] += 2.0
        bar.update(1)
    assert _left(bar) == "01:10" and "2.00s/step" in str(bar)  # 35 steps x 2 s; the 30-s start-up left out
    bar.close()
