"""The pretraining progress bar: tqdm, with a time-left estimate that a user can trust from the first line.

tqdm estimates the time left from every step since the bar opened, and the first step of a run carries the
start-up (data workers spawning, the first forward building its kernels): 24 s for a 1.2-s step turned an
8-minute run's first estimate into 2 h 39 min. Here the rate is measured from the end of the first step on,
and with a time budget (``train.max_seconds``) the time left is never more than what is left of the budget.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{left}, {rate_fmt}{postfix}]"


class TrainBar(tqdm):
    """``tqdm`` over optimizer steps; ``budget_seconds`` (0 = none) counts from when the bar opens."""

    def __init__(self, *args: Any, budget_seconds: float = 0.0, **kwargs: Any) -> None:
        self._budget = budget_seconds
        self._since: tuple[float, float] | None = None  # (steps, time) at the end of the start-up step
        super().__init__(*args, bar_format=BAR_FORMAT, **kwargs)

    def update(self, n: float = 1) -> bool | None:
        if self._since is None:  # this step carried the start-up: the rate is measured from its end
            self._since = (self.n + n, self._time())
        return super().update(n)

    def seconds_per_step(self) -> float | None:
        """Mean time of the steps after the first (checkpoints and monitor pauses included); None before."""
        if self._since is None or self.n <= self._since[0]:
            return None
        return (self._time() - self._since[1]) / (self.n - self._since[0])

    def seconds_left(self) -> tuple[float | None, bool]:
        """(estimate, whether the time budget is what bounds it); None while no step-time is measured."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return None, False
        steps_left = per_step * max(0, (self.total or 0) - self.n)
        # tqdm's clock (self._time) and start time, so the elapsed time shown and the estimate agree
        budget_left = max(0.0, self.start_t + self._budget - self._time()) if self._budget > 0 else None
        if budget_left is not None and budget_left < steps_left:
            return budget_left, True
        return steps_left, False

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        per_step = self.seconds_per_step()
        values["rate"] = 1.0 / per_step if per_step else None
        values["initial"] = self.n if per_step is None else values["initial"]  # no rate yet: tqdm shows '?'
        seconds, by_budget = self.seconds_left()
        values["left"] = (
            "?" if seconds is None else self.format_interval(seconds) + (" (time budget)" if by_budget else "")
        )
        return values
