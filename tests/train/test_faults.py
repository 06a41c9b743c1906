"""Storage faults as users meet them: a run directory that cannot be written, and a disk that fills up
while a checkpoint is written. Faults are injected from outside (the OS, or monkeypatching the file
writers); the checks are what a user sees (one line, exit status 2) and what is left on disk."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from trainhelpers import tiny_overrides

from ssl_hybrid.cli import main
from ssl_hybrid.config import load_config
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train import engine


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.mark.fault(injected="a run directory that cannot be written (a file in its path; permissions; EACCES)",
                   did="stops before building anything: exit 2 and one line naming the directory and the OS error",
                   lost="nothing")
@pytest.mark.parametrize("how", ["file_in_the_way", "read_only", "permission_error"])
def test_unwritable_run_directory_is_one_line_before_training(corpus, run_root, capsys, monkeypatch, how):
    output_dir = run_root / "out"
    if how == "file_in_the_way":
        run_root.joinpath("out").write_text("not a directory")
        output_dir = output_dir / "runs"
    elif how == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits (the permission_error case injects EACCES instead)")
        output_dir.mkdir()
        output_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:
        real_mkdir = os.mkdir

        def denied(path, *args, **kwargs):
            if str(path).startswith(str(output_dir)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", denied)
    code = main(["-q", "pretrain", *tiny_overrides(output_dir, "nowrite")])
    err = capsys.readouterr().err
    assert code == 2
    assert error_lines(err) == [f"ssl-hybrid pretrain: error: {output_dir / 'nowrite'}: cannot write the run directory "
                                f"({os.strerror(errno.ENOTDIR if how == 'file_in_the_way' else errno.EACCES)}); "
                                "choose a writable train.output_dir"]


@pytest.mark.slow
@pytest.mark.fault(injected="disk full (ENOSPC) half-way through writing the step-4 checkpoint",
                   did="exit 2 with one line naming the checkpoint and the newest complete one; the temp dir is "
                       "removed; re-running resumes from step 2 and ends bit-identical to an uninterrupted run",
                   lost="the steps after the last complete checkpoint (recomputed on resume)")
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_resume_uses_it(corpus, run_root, capsys,
                                                                                      monkeypatch):
    overrides = tiny_overrides(run_root, "full", train__steps=4, train__checkpoint_every=2)
    real_save = ckpt.save_file
    calls = []

    def fills_the_disk(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the step-4 (final) checkpoint: half a file, then no space left
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    code = main(["-q", "pretrain", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    checkpoints = run_root / "full" / "checkpoints"
    assert error_lines(err) == [
        f"ssl-hybrid pretrain: error: {checkpoints / 'step_00000004'}: could not write the checkpoint (No space left "
        f"on device); nothing was replaced, the newest complete checkpoint is {checkpoints / 'step_00000002'}: free "
        "space and re-run to resume"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # no temp dir, nothing half-written
    assert not (run_root / "full" / "model").exists()

    monkeypatch.setattr(ckpt, "save_file", real_save)  # space freed: the same command again
    assert main(["pretrain", *overrides]) == 0
    assert f"resumed from {checkpoints / 'step_00000002'} (step 2 of 4)" in capsys.readouterr().err
    engine.pretrain(load_config(None, tiny_overrides(run_root, "straight", train__steps=4, train__checkpoint_every=2)))
    resumed = load_file(str(checkpoints / "step_00000004" / "model.safetensors"))
    straight = load_file(str(run_root / "straight" / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
