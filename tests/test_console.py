"""What the console shows: log lines that do not land on a progress bar, and a quickstart --help that
says what stops the run (read from the recipe, whatever model it names)."""

from __future__ import annotations

import io
import logging

import pytest

from ssl_hybrid.logs import setup_logging


def rendered_lines(text: str) -> list[str]:
    """What a terminal shows: each '\\r' returns to the line start and what follows overwrites it."""
    lines = []
    for raw in text.split("\n"):
        shown: list[str] = []
        for part in raw.split("\r"):
            shown[:len(part)] = list(part)
        lines.append("".join(shown).rstrip())
    return lines


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def _bar_then_log(stream) -> str:
    from tqdm import tqdm

    bar = tqdm(total=10, file=stream, desc="quickstart", mininterval=0, ascii=True)
    bar.update(3)
    logging.getLogger("ssl_hybrid.train.engine").info("online k-NN at step 3: top-1 4.2%")
    bar.update(1)
    bar.close()
    return stream.getvalue()


def test_log_lines_are_written_above_the_progress_bar(restore_logging):
    stream = io.StringIO()
    setup_logging(0, stream=stream)
    lines = rendered_lines(_bar_then_log(stream))
    logged = [line for line in lines if "online k-NN at step 3" in line]
    assert len(logged) == 1 and "3/10" not in logged[0] and "|" not in logged[0]
    assert logged[0].split(" ", 1)[1].startswith("INFO ssl_hybrid.train.engine: online k-NN")
    assert any("4/10" in line for line in lines)  # the bar was redrawn below it


def test_a_plain_stream_handler_would_print_over_the_bar(restore_logging):
    """The failure the handler prevents, shown with logging's own StreamHandler (so the check above can fail)."""
    stream = io.StringIO()
    logging.getLogger().handlers[:] = [logging.StreamHandler(stream)]
    logging.getLogger().setLevel(logging.INFO)
    logged = [line for line in rendered_lines(_bar_then_log(stream)) if "online k-NN" in line]
    assert "3/10" in logged[0]


def test_quickstart_help_says_what_stops_the_run(capsys):
    from ssl_hybrid.cli import main
    from ssl_hybrid.config import load_config
    from ssl_hybrid.quickstart import QUICKSTART_RECIPE

    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    recipe = load_config(QUICKSTART_RECIPE)
    assert f"pretrain {recipe.model.name} with" in text and f"({recipe.train.steps} steps at" in text
    assert "stops at train.steps or after --minutes, whichever comes first" in text
    assert "whichever comes first" in text.split("--minutes MINUTES", 1)[1]
