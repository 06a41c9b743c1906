"""`ssl-hybrid export`: a checkpoint's student backbone -> a model folder outside checkpoints/ (which pruning
deletes), never replacing an existing folder without --force."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssl_hybrid.cli import main
from ssl_hybrid.config import load_config, to_yaml
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train.wiring import build_backbone
from tests.train.trainhelpers import tiny_overrides


def _fake_run(root):
    """A run with two complete checkpoints (steps 2 and 4) holding different student backbones."""
    config = load_config(None, tiny_overrides(root, "run"))
    run = root / "run"
    for step in (2, 4):
        folder = run / "checkpoints" / ckpt.step_dir_name(step)
        folder.mkdir(parents=True)
        torch.manual_seed(step)
        state = {f"backbone.{k}": v.contiguous() for k, v in build_backbone(config).state_dict().items()}
        save_file(state, str(folder / ckpt.MODEL_FILE))
        torch.save({}, folder / ckpt.STATE_FILE)
        (folder / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    return run


def _weights_of(step_dir):
    return {k[len("backbone."):]: v for k, v in load_file(str(step_dir / ckpt.MODEL_FILE)).items()}


@pytest.mark.fault(injected="exporting a run twice, a step whose checkpoint is later pruned, and into `checkpoints/`",
                   did="a run exports to `<run>/model/`, a step to `<run>/exports/step_<N>/` (outside what pruning "
                       "deletes); an existing export is refused without `--force`, a folder in `checkpoints/` always",
                   lost="nothing")
def test_export_writes_outside_checkpoints_and_never_replaces_without_force(tmp_path, capsys):
    run = _fake_run(tmp_path)
    step2, step4 = run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000004"
    assert main(["-q", "export", str(run)]) == 0
    model = run / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["ssl_hybrid"]["step"] == 4 and config["architecture"] == "hybrid_nano"
    exported = load_file(str(model / "model.safetensors"))
    assert exported.keys() == _weights_of(step4).keys()
    assert all(torch.equal(exported[k], v) for k, v in _weights_of(step4).items())
    before = (model / "model.safetensors").read_bytes()

    assert main(["-q", "export", str(step2)]) == 0  # a step: its own folder, outside checkpoints/
    early = run / "exports" / "step_00000002"
    expected = _weights_of(step2)
    ckpt.prune(run, 1)  # training goes on: the step-2 checkpoint is deleted, its export is not
    assert not step2.exists() and json.loads((early / "config.json").read_text())["ssl_hybrid"]["step"] == 2
    assert all(torch.equal(load_file(str(early / "model.safetensors"))[k], v) for k, v in expected.items())
    assert main(["-q", "export", str(run)]) == 2
    assert f"{model}: already exists; pass --force" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before
    assert main(["-q", "export", str(run), "--out-dir", str(run / "checkpoints" / "mine")]) == 2
    assert "export outside it" in capsys.readouterr().err and not (run / "checkpoints" / "mine").exists()
    assert main(["-q", "export", str(run), "--force"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "exports", "model"]  # no temp folder left


def test_the_published_data_source_carries_no_credentials_or_home_folders():
    from ssl_hybrid.models.export import public_source

    assert public_source("https://me:s3cret@host/s-{000..009}.tar?X-Amz-Signature=abc") == "https://host/s-{000..009}.tar"
    assert public_source("pipe:curl -s https://me:s3cret@host/a.tar") == "pipe:curl -s https://host/a.tar"
    assert public_source("/home/alice/corpora/pets") == "pets" and public_source("data/pets37") == "data/pets37"
    # the logs' redaction applies too: a bearer token in a pipe: command never reaches config.json or the card
    assert public_source('pipe:curl -s -H "Authorization: Bearer abc123" https://host/a.tar') == \
        'pipe:curl -s -H "Authorization: Bearer ***" https://host/a.tar'


def test_a_run_exported_the_old_way_without_checkpoints_is_rewritten_as_a_model_folder(tmp_path):
    """A search-proxy run keeps only its old export (backbone.safetensors + backbone.json): export converts it."""
    from ssl_hybrid.models import load_backbone
    from ssl_hybrid.models.export import make_meta, write_meta

    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, tiny_overrides(tmp_path, "run"))
    (run / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    old = build_backbone(config).eval()
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(run / "backbone.safetensors"))
    write_meta(run / "backbone.json", make_meta(old, {"image_size": 32, "step": 4, "run": "run"}))
    assert main(["-q", "export", str(run)]) == 0
    folder_config = json.loads((run / "model" / "config.json").read_text())
    assert folder_config["ssl_hybrid"]["step"] == 4 and folder_config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # eval.pooling=multiscale: the folder's default embedding is the multi-scale one
        torch.testing.assert_close(load_backbone(run / "model")(x), old.forward_multiscale(x), atol=0, rtol=0)


@pytest.mark.fault(injected="the end-of-run export raising something other than a UserError (a ValueError from the "
                            "model record, say) on the main process",
                   did="one line naming the model folder and the error, raised on every rank after the flag all-reduce",
                   lost="nothing: the checkpoints stay; re-running the same command exports")
def test_an_unexpected_export_error_is_one_line_shared_by_every_rank(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from accelerate import Accelerator

    from ssl_hybrid.errors import UserError
    from ssl_hybrid.train import export as train_export

    def broken(*args, **kwargs):
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr(train_export, "save_run_model", broken)
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), raw_model=SimpleNamespace(backbone=None), config=None,
                          directory=tmp_path, counters=SimpleNamespace(step=3))
    try:
        with pytest.raises(UserError, match=r"model: the export failed \(ValueError: Out of range"):
            train_export.export_backbone(run, {})
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # as pretrain does, for the tests after this one


@pytest.mark.fault(injected="`export --force` (and a step export) into a run folder whose lock another process "
                            "holds, as its trainer does while it trains and writes `<run>/model/` itself",
                   did="refused at once with one line naming the folder and the lock (exit 2), `model/` untouched; "
                       "an export elsewhere (--out-dir) still works while the run trains",
                   lost="nothing")
def test_export_into_a_run_that_is_training_is_refused_with_one_line(tmp_path, capsys):
    from filelock import FileLock

    run = _fake_run(tmp_path)
    assert main(["-q", "export", str(run)]) == 0
    before = (run / "model" / "model.safetensors").read_bytes()
    lock = tmp_path / ".run.lock"  # the trainer's lock (ssl_hybrid.runs.claim), taken by another holder
    holder = FileLock(lock)
    holder.acquire()
    try:
        capsys.readouterr()
        assert main(["-q", "export", str(run), "--force"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert main(["-q", "export", str(run / "checkpoints" / "step_00000002")]) == 2
        assert main(["-q", "export", str(run), "--out-dir", str(tmp_path / "elsewhere")]) == 0
    finally:
        holder.release()
    assert lines == [f"ssl-hybrid export: error: {run / 'model'}: {run} is in use by another ssl-hybrid process, "
                     f"e.g. its trainer (it holds {lock}); export when it has ended, or elsewhere with --out-dir"]
    assert (run / "model" / "model.safetensors").read_bytes() == before and not (run / "exports").exists()
    assert main(["-q", "export", str(run), "--force"]) == 0  # free again
