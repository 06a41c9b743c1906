"""Logging set-up shared by every subcommand: one format, -v/-q control the level."""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings only), 0 info, 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    if verbosity <= 0:
        # Third-party chatter that users cannot act on.
        for noisy in ("PIL", "matplotlib", "urllib3", "accelerate.utils.other", "faiss.loader"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
