"""Logging set-up shared by every subcommand: one format, -v/-q control the level.

Records go through :class:`TqdmHandler`, which writes with ``tqdm.write``: an active progress bar is
cleared, the line printed, the bar redrawn, so log lines (online k-NN, warnings) never land on the bar.
"""

from __future__ import annotations

import logging
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TqdmHandler(logging.StreamHandler):
    """A stream handler that prints through ``tqdm.write`` so it cooperates with live progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def setup_logging(verbosity: int = 0, stream=None) -> None:
    """verbosity: -1 quiet (warnings only), 0 info, 1+ debug. ``stream`` defaults to stderr."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = TqdmHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    if verbosity <= 0:
        # Third-party chatter that users cannot act on.
        for noisy in ("PIL", "matplotlib", "urllib3", "accelerate.utils.other", "faiss.loader"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
