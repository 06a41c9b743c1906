"""The `ssl-hybrid` entry point: help, version, and one-line exit-2 errors for bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssl_hybrid import __version__
from ssl_hybrid.cli import build_parser, main

# Subcommands that start a run from a recipe; each must refuse a bad config before creating anything.
_SUBCOMMANDS = build_parser()._subparsers._group_actions[0].choices
RECIPE_COMMANDS = [name for name in ("config", "pretrain") if name in _SUBCOMMANDS]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_hybrid", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_module_entry_point_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "config" in result.stdout and "bench" in result.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and __version__ in version.stdout


HEAVY_MODULES = ("torch", "timm", "lightly", "accelerate", "faiss", "webdataset")


def test_building_the_parser_imports_no_heavy_library():
    probe = ("import sys, ssl_hybrid.cli as cli; cli.build_parser(); "
             f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules) or 'none')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none", f"building the parser imported {result.stdout.strip()}"


def test_console_script_help_and_version():
    script = Path(sys.executable).with_name("ssl-hybrid")
    if not script.exists():
        pytest.skip("the ssl-hybrid console script is not installed next to this python")
    help_run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "usage: ssl-hybrid" in help_run.stdout and "pretrain" in help_run.stdout
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"ssl-hybrid {__version__}"


def test_lazily_declared_arguments_parse_and_show_in_help(capsys):
    args = build_parser().parse_args(["finetune", "timm:resnet10t", "--epochs", "3"])
    assert args.epochs == 3 and args.batch_size > 0 and args.handler is not None
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "data", "--help"])
    assert exit_info.value.code == 0
    assert "--repeats" in capsys.readouterr().out


def test_subcommand_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--num-processes" in out and "(default: 1)" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def test_config_explain_lists_every_key(capsys):
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "train.max_seconds" in out and "objective.mask_ratio" in out


BAD_CASES = {
    "unknown_nested_key": ("train:\n  stpes: 5\n", [], "unknown key 'train.stpes'"),
    "wrong_type": ("optim:\n  lr: quick\n", [], "optim.lr"),
    "malformed_yaml": ("train: [1, 2\n", [], "malformed YAML"),
    "negative_lr": ("optim:\n  lr: -1.0\n", [], "optim.lr"),
    "mask_ratio_out_of_range": ("objective:\n  mask_ratio: 1.5\n", [], "objective.mask_ratio"),
    "override_typo": ("", ["optim.lrr=0.1"], "unknown key 'optim.lrr'"),
    "override_wrong_type": ("", ["train.steps=many"], "train.steps"),
}


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, command, case):
    text, overrides, expected = BAD_CASES[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(text or "name: bad\n")
    output_dir = tmp_path / "runs"
    args = [command, "-c", str(recipe), f"train.output_dir={output_dir}", *overrides]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert "Traceback" not in err
    if overrides:
        assert "command line" in err
    else:
        assert str(recipe) in err
    assert not output_dir.exists()


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
def test_missing_recipe_file_exits_2(tmp_path, capsys, command):
    missing = tmp_path / "missing.yaml"
    assert main([command, "-c", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "not found" in err and len(err.splitlines()) == 1


def test_batch_not_divisible_across_processes_exits_2(capsys):
    assert main(["config", "--num-processes", "3", "train.batch_size=64"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "divisible" in err


def test_bad_config_through_real_process_has_no_traceback(tmp_path):
    result = run_cli("config", "optim.lr=-1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "optim.lr" in result.stderr


@pytest.mark.slow
@pytest.mark.fault(injected="the reader of stdout gone before the command prints (`ssl-hybrid config --explain` "
                            "piped into `head -1`, as `neighbors` piped into `head -1`)",
                   did="exits quietly with status 1 (the Python docs' SIGPIPE recipe): no traceback, no "
                       "'Exception ignored' line",
                   lost="nothing (the output nobody reads)")
def test_a_closed_stdout_pipe_ends_the_command_quietly():
    process = subprocess.Popen([sys.executable, "-m", "ssl_hybrid", "config", "--explain"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # `head -1` exited: every write from now on meets a closed pipe
    err = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_a_broken_pipe_that_is_not_stdout_is_a_real_error(monkeypatch):
    """Only a closed stdout ends quietly: a worker's or subprocess's broken pipe must surface, not exit 1 silently."""
    import ssl_hybrid.cli as cli

    def failing(argv):
        raise BrokenPipeError("a data worker's pipe")

    monkeypatch.setattr(cli, "_main", failing)
    with pytest.raises(BrokenPipeError, match="data worker"):
        cli.main([])
