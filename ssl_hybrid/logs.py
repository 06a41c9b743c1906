"""Logging set-up shared by every subcommand: one format, -v/-q control the level.

Records go through :class:`TqdmHandler`, which writes with ``tqdm.write``: an active progress bar is
cleared, the line printed, the bar redrawn, so log lines (online k-NN, warnings) never land on the bar.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Credentials that shard URLs and pipe: commands carry: user:password@ in a URL, signed or keyed query
# strings (S3 X-Amz-Signature/-Credential/-Security-Token, GCS X-Goog-*, Azure SAS sig, token=, key=) and HTTP
# Authorization values. Logs and TensorBoard files are shared with people who should not get them.
_SECRETS = (
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*:/{1,2})[^/\s@'\"]+@"), r"\1***@"),  # ':/' once a path was normalised
    (
        re.compile(
            r"(?i)([?&][^=&#\s'\"]*(?:signature|sig|token|credential|secret|password|passwd|key|auth)"
            r"[^=&#\s'\"]*=)[^&#\s'\"]*"
        ),
        r"\1***",
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
)


def redact(text: str) -> str:
    """``text`` with the credentials a URL or a pipe: command may hold replaced by ``***``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats a record, then :func:`redact` s it: every log line, tracebacks included, whoever logged it."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


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
    handler.setFormatter(RedactingFormatter(FORMAT, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    if verbosity <= 0:
        # Third-party chatter that users cannot act on.
        for noisy in ("PIL", "matplotlib", "urllib3", "accelerate.utils.other", "faiss.loader"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
