"""A run folder is the user's: names stay inside train.output_dir, one writer at a time, --fresh deletes only a
run and only once the new one is built, a changed config or changed data is refused, moving the folder is not,
checkpoints are durable, swapped in whole and written or refused alike on every rank, and an unreadable newest
checkpoint falls back to the previous one. Faults are injected from outside (the command line, another lock
holder, the file system, monkeypatched writers); the checks are what the user sees and what is left on disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from trainhelpers import CORPUS, tiny_overrides

from ssl_hybrid import runs
from ssl_hybrid.cli import main
from ssl_hybrid.config import Config, load_config, to_dict
from ssl_hybrid.errors import UserError
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train import engine


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (what 'nothing was touched' compares), run-folder locks left out:
    ``<output_dir>/.<name>.lock`` stays when released (deleting a lock file races with the next holder)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))}


def no_training(monkeypatch):
    """Fail fast if a refused command went on to train or evaluate anyway."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command should have been refused before training")

    monkeypatch.setattr(engine, "train", refuse)
    monkeypatch.setattr("ssl_hybrid.eval.report.build_report", refuse)


# ------------------------------------------------------------------------------------- run names

@pytest.mark.fault(injected="run names '..', '.', 'a/b', an absolute path, and a name that is a symlink out of "
                            "train.output_dir (quickstart --fresh name=.. used to delete the parent of runs/)",
                   did="refused with one line naming the key before anything is written or deleted (exit 2)",
                   lost="nothing")
@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "escape"])
def test_run_names_that_leave_the_output_folder_are_refused_before_anything_is_touched(tmp_path, capsys,
                                                                                       monkeypatch, name):
    output_dir = tmp_path / "work" / "runs"
    (output_dir / "old").mkdir(parents=True)
    (output_dir / "old" / "config.yaml").write_text("name: old\ntrain: {}\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("the user's")
    (output_dir / "escape").symlink_to(tmp_path / "outside")
    before = tree(tmp_path)
    no_training(monkeypatch)
    code = main(["-q", "quickstart", "--fresh", "--output-dir", str(output_dir), f"name={name}"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(error_lines(err)) == 1
    assert "'name'" in err or "outside train.output_dir" in err
    assert tree(tmp_path) == before
    assert not list(tmp_path.rglob("*.lock"))  # refused before the run folder was even claimed


# ------------------------------------------------------------------------------------- --fresh

@pytest.mark.fault(injected="quickstart --fresh with a typo in data.train over an existing run",
                   did="refused with one line naming the missing data after the config, model and data were "
                       "built, before --fresh deleted anything (exit 2)",
                   lost="nothing: the old run is intact")
def test_fresh_with_a_typo_keeps_the_old_run(tmp_path, capsys, monkeypatch):
    config = load_config(None, tiny_overrides(tmp_path, "quickstart"))
    runs.prepare_run_dir(config)
    runs.append_metrics(tmp_path / "quickstart", {"step": 1, "loss": 1.0})
    before = tree(tmp_path)
    no_training(monkeypatch)
    missing = tmp_path / "pets37_typo"
    code = main(["-q", "quickstart", "--fresh", *tiny_overrides(tmp_path, "quickstart", data__train=missing,
                                                                data__num_local_views=0)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(error_lines(err)) == 1 and str(missing) in error_lines(err)[0]
    assert tree(tmp_path) == before


@pytest.mark.fault(injected="pretrain --fresh on a folder that is not a run (no config.yaml: the user's own files)",
                   did="refused with one line saying it is not a run folder (exit 2)",
                   lost="nothing: the folder is left as it was")
def test_fresh_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, monkeypatch):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("months of work")
    before = tree(tmp_path)
    no_training(monkeypatch)
    code = main(["-q", "pretrain", "--fresh", *tiny_overrides(tmp_path, "thesis")])
    err = capsys.readouterr().err
    assert code == 2
    assert error_lines(err) == [f"ssl-hybrid pretrain: error: {tmp_path / 'thesis'}: --fresh deletes only a run "
                                "folder of ssl-hybrid, and this one has no config.yaml; move it away yourself or "
                                "choose another name="]
    assert tree(tmp_path) == before


def test_fresh_deletes_a_run_folder_whole(tmp_path):
    config = load_config(None, tiny_overrides(tmp_path, "old"))
    directory = runs.prepare_run_dir(config)
    (directory / "checkpoints" / "step_00000002").mkdir()
    assert runs.not_a_run(directory) is None
    runs.start_fresh(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no leftover trash folder
    runs.start_fresh(directory)  # nothing there: nothing to do


# ------------------------------------------------------------------------------------- one writer

@pytest.mark.fault(injected="a second pretrain on a run folder another process holds (its lock taken from outside)",
                   did="refused at once with one line naming the folder and the lock (exit 2); the holder's run "
                       "folder is not written",
                   lost="nothing")
def test_a_run_folder_in_use_is_refused(tmp_path, capsys, monkeypatch):
    from filelock import FileLock

    directory = tmp_path / "busy"
    lock = tmp_path / ".busy.lock"  # next to the run folder (docs/configuration.md: Run folders)
    holder = FileLock(lock)  # another holder, as another process's lock is to this one
    holder.acquire()
    try:
        no_training(monkeypatch)
        code = main(["-q", "pretrain", *tiny_overrides(tmp_path, "busy")])
        err = capsys.readouterr().err
    finally:
        holder.release()
    assert code == 2
    assert error_lines(err) == [f"ssl-hybrid pretrain: error: {directory}: in use by another ssl-hybrid process (it "
                                f"holds {lock}); wait for it to end, or choose another name= or "
                                "train.output_dir="]
    assert not directory.exists()
    with runs.claim(directory), runs.claim(directory):  # free again, and re-entrant in the holding process
        pass


# ------------------------------------------------------------------------------------- changed config

@pytest.mark.fault(injected="re-running a run name with a changed config before its first checkpoint (only "
                            "config.yaml records the run)",
                   did="refused with one line naming config.yaml and the differing key (exit 2)",
                   lost="nothing: config.yaml and metrics.jsonl keep the first run's")
def test_a_changed_config_is_refused_against_config_yaml(tmp_path, capsys, monkeypatch):
    runs.prepare_run_dir(load_config(None, tiny_overrides(tmp_path, "early")))
    runs.append_metrics(tmp_path / "early", {"step": 1, "loss": 1.0})
    before = tree(tmp_path)
    no_training(monkeypatch)
    code = main(["-q", "pretrain", *tiny_overrides(tmp_path, "early", objective__mask_ratio=0.5)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(error_lines(err)) == 1
    assert f"{tmp_path / 'early' / 'config.yaml'}: written with a different config (objective.mask_ratio: 0.75 -> " \
           "0.5)" in err
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------- a trained run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2, on a private copy of the embedded corpus."""
    if not (CORPUS / "manifest.json").exists():
        pytest.skip("embedded corpus data/pets37 not present")
    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    shutil.copytree(CORPUS, data)
    overrides = tiny_overrides(root / "runs", "first", train__steps=2, train__checkpoint_every=1, data__train=data)
    engine.pretrain(load_config(None, overrides))
    assert [p.name for p in ckpt.list_checkpoints(root / "runs" / "first")] == ["step_00000001", "step_00000002"]
    return root


def copy_run(trained: Path, output_dir: Path, name: str) -> list[str]:
    """The trained run copied to <output_dir>/<name>; its overrides there."""
    shutil.copytree(trained / "runs" / "first", output_dir / name)
    return tiny_overrides(output_dir, name, train__steps=2, train__checkpoint_every=1, data__train=trained / "data")


@pytest.mark.slow
@pytest.mark.fault(injected="the run folder moved to another train.output_dir and renamed, then resumed",
                   did="resumes from its newest checkpoint (name and train.output_dir say where the run is, not "
                       "what it computes)",
                   lost="nothing")
def test_a_moved_and_renamed_run_resumes(trained, tmp_path, caplog):
    overrides = copy_run(trained, tmp_path / "elsewhere", "renamed")
    with caplog.at_level(logging.INFO, logger="ssl_hybrid.train"):
        summary = engine.pretrain(load_config(None, overrides))
    assert summary["step"] == 2
    assert f"resumed from {tmp_path / 'elsewhere' / 'renamed' / 'checkpoints' / 'step_00000002'}" in caplog.text


@pytest.mark.slow
@pytest.mark.fault(injected="the shards under data.train rewritten with other content (same path, same shard "
                            "count) between a run and its resume",
                   did="refused with one line naming data.train and the manifest fingerprints (exit 2)",
                   lost="nothing: the checkpoints are untouched")
def test_changed_data_under_the_same_path_is_refused(trained, tmp_path, capsys):
    overrides = copy_run(trained, tmp_path, "resumed")
    data = trained / "data"
    manifest_text = (data / "manifest.json").read_text()
    first, second = (data / "pets37-000000.tar").read_bytes(), (data / "pets37-000001.tar").read_bytes()
    manifest = json.loads(manifest_text)
    shard0, shard1 = manifest["shards"][:2]
    shard0["sha256"], shard1["sha256"] = shard1["sha256"], shard0["sha256"]
    try:  # what re-running `ssl-hybrid shards` on other images into the same folder does
        (data / "pets37-000000.tar").write_bytes(second)
        (data / "pets37-000001.tar").write_bytes(first)
        (data / "manifest.json").write_text(json.dumps(manifest))
        before = tree(tmp_path)
        code = main(["-q", "pretrain", *overrides])
        err = capsys.readouterr().err
    finally:
        (data / "pets37-000000.tar").write_bytes(first)
        (data / "pets37-000001.tar").write_bytes(second)
        (data / "manifest.json").write_text(manifest_text)
    assert code == 2
    assert len(error_lines(err)) == 1
    assert f"data.train {data} is not the data this run trained on (shard manifest fingerprint" in err
    assert tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.fault(injected="the newest checkpoint's model.safetensors truncated (a crash of the storage, not of "
                            "the writer)",
                   did="a warning names it, it is set aside as step_<n>.unreadable, and the run resumes from the "
                       "previous complete checkpoint",
                   lost="the steps after the previous checkpoint (recomputed)")
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, caplog):
    overrides = copy_run(trained, tmp_path, "resumed")
    checkpoints = tmp_path / "resumed" / "checkpoints"
    bad = checkpoints / "step_00000002" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])
    with caplog.at_level(logging.INFO, logger="ssl_hybrid.train"):
        summary = engine.pretrain(load_config(None, overrides))
    assert summary["step"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad) in message and "falling back" in message for message in warnings)
    assert f"resumed from {checkpoints / 'step_00000001'}" in caplog.text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001", "step_00000002",
                                                              "step_00000002.unreadable"]
    redone = load_file(str(checkpoints / "step_00000002" / "model.safetensors"))
    original = load_file(str(trained / "runs" / "first" / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.equal(redone[k], original[k]) for k in original)  # the same step recomputed exactly


# ------------------------------------------------------------------------------------- the checkpoint writer

class FakeAccelerator:
    """Rank ``index`` of two processes; the other rank's failure flag is ``other_failed``. Records collectives."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, index: int = 0, other_failed: bool = False):
        self.process_index, self.other_failed, self.events = index, other_failed, []

    def gather(self, flag):
        self.events.append("gather")
        return torch.cat([flag, torch.tensor([float(self.other_failed)])])

    def wait_for_everyone(self):
        self.events.append("barrier")


def save(run_dir: Path, step: int, model: torch.nn.Module, accelerator=None) -> Path:
    config = Config()
    return ckpt.save_checkpoint(run_dir, step, model, {"config": to_dict(config)}, {"rank": 0}, config,
                                {"model_name": "linear"}, accelerator)


@pytest.mark.fault(injected="a file-size limit / full disk as the real writers report it: safetensors' "
                            "SafetensorError, torch.save's RuntimeError (the other rank fine)",
                   did="CheckpointError (one line, exit 2) on every rank, agreed before any rank waits at a "
                       "barrier; the temp folder is removed",
                   lost="nothing: the previous checkpoint is untouched")
@pytest.mark.parametrize("writer, error", [
    ("save_file", SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge })")),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                                "file data/0: file write failed\nmore detail"))])
def test_any_writer_error_is_one_line_on_every_rank_and_leaves_no_temp_folder(tmp_path, monkeypatch, writer, error):
    model = torch.nn.Linear(2, 2)
    previous = save(tmp_path, 1, model)
    before = tree(tmp_path)

    def fails(*args, **kwargs):
        raise error

    if writer == "save_file":
        monkeypatch.setattr(ckpt, "save_file", fails)
    else:
        monkeypatch.setattr(ckpt.torch, "save", fails)
    accelerator = FakeAccelerator(index=0)
    with pytest.raises(ckpt.CheckpointError) as raised:
        save(tmp_path, 2, model, accelerator)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert message.startswith(f"{tmp_path / 'checkpoints' / 'step_00000002'}: could not write the checkpoint (")
    assert f"the newest complete checkpoint is {previous}" in message
    assert accelerator.events == ["gather"]  # every rank learned of it; no rank was left at a barrier
    assert tree(tmp_path) == before  # no temp folder, the previous checkpoint as it was
    other = FakeAccelerator(index=1, other_failed=True)  # the other side: rank 1 learns rank 0 failed
    with pytest.raises(ckpt.CheckpointError, match="failed on another process"):
        save(tmp_path, 2, model, other)
    assert other.events == ["gather"] and tree(tmp_path) == before


@pytest.mark.fault(injected="saving a step that exists (a re-run of a finished run) when renaming the new copy "
                            "in fails (EIO)",
                   did="CheckpointError with one line; the step's complete old copy is back in place",
                   lost="nothing")
def test_resaving_a_step_never_deletes_the_complete_copy_first(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    final = save(tmp_path, 3, model)
    before = tree(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name == ".tmp_step_00000003":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write the checkpoint \(Input/output error\)"):
        save(tmp_path, 3, model)
    assert tree(tmp_path) == before and ckpt.list_checkpoints(tmp_path) == [final]
    monkeypatch.setattr(os, "rename", real_rename)
    save(tmp_path, 3, model)  # the swap: the new copy in, the old one gone, nothing else left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]
    assert torch.equal(load_file(str(final / "model.safetensors"))["weight"], model.weight.detach())


def test_a_crash_between_the_two_renames_of_a_swap_is_repaired_on_the_next_start(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / ".step_00000003.replaced-0123abcd").mkdir(parents=True)  # old copy aside, new one not yet in
    (folder / ".step_00000003.replaced-0123abcd" / "state.pt").write_text("old")
    (folder / "step_00000002").mkdir()
    (folder / ".step_00000002.replaced-89abcdef").mkdir()  # the swap was done: only the delete was missing
    ckpt.remove_partial(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000003"]
    assert (folder / "step_00000003" / "state.pt").read_text() == "old"


@pytest.mark.fault(injected="a power cut right after a checkpoint's rename (simulated: the fsync and rename calls "
                            "are recorded)",
                   did="every file and the temp folder are fsynced before the rename, the checkpoints folder after it",
                   lost="nothing: the renamed checkpoint is on disk")
def test_checkpoints_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = save(tmp_path, 1, torch.nn.Linear(2, 2))
    tmp = str(tmp_path / "checkpoints" / ".tmp_step_00000001")
    renamed = events.index(("rename", str(final)))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    assert synced >= {f"{tmp}/{p.name}" for p in final.iterdir()} | {tmp}
    assert ("fsync", str(tmp_path / "checkpoints")) in events[renamed:]


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """Results, manifests and meta.json are read by the user's group and by other jobs: mkstemp's 0600 must not
    stick to them (one writer, runs.write_text_atomic, for JSON and CSV alike)."""
    import os

    from ssl_hybrid.eval.predict import write_rows

    old = os.umask(0o022)
    try:
        written = [runs.write_json_atomic(tmp_path / "result.json", {"top1": 0.5}),
                   write_rows(tmp_path / "predictions.csv", [{"image": "a.jpg", "rank": 1}], ("image", "rank"))]
    finally:
        os.umask(old)
    assert [oct(path.stat().st_mode & 0o777) for path in written] == [oct(0o644)] * 2
    assert (tmp_path / "predictions.csv").read_text().splitlines() == ["image,rank", "a.jpg,1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.fault(injected="the file-size limit (a full disk) is hit while config.yaml or a search recipe is written",
                   did="the write fails with the OS error; the previous file is intact and no temp file is left "
                       "beside it (one helper, runs.atomic_path, for every file written through a temp name)",
                   lost="nothing")
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    import resource
    import signal

    from ssl_hybrid.config import load_config, write_config
    from ssl_hybrid.search.recipe import write_recipe

    config = load_config()
    writers = {"config.yaml": lambda: write_config(config, tmp_path),
               "recipe.yaml": lambda: write_recipe(tmp_path / "recipe.yaml", {"name": "x" * 4096})}
    for name in writers:
        (tmp_path / name).write_text("previous\n")
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), no signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        for write in writers.values():
            with pytest.raises(OSError):
                write()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)
    assert all((tmp_path / name).read_text() == "previous\n" for name in writers)
