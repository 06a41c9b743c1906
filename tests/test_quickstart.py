"""`ssl-hybrid quickstart` end to end, shrunk (hybrid_nano, 32 px, a few steps) to stay fast."""

from __future__ import annotations

import json

import pytest

from ssl_hybrid.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["model.name=hybrid_nano", "data.image_size=32", "data.local_image_size=16", "data.num_workers=0",
        "train.steps=3", "train.batch_size=8", "train.knn_every=3", "train.checkpoint_every=0"]


@pytest.mark.slow
def test_quickstart_writes_report_plot_grids_and_prints_table(tmp_path, capsys):
    out = tmp_path / "qs.json"
    assert main(["quickstart", "--minutes", "2", "--output-dir", str(tmp_path), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "quickstart"
    report = json.loads(out.read_text())
    names = [entry["name"] for entry in report["entries"]]
    assert names == ["hybrid_nano pretrained (3 steps)", "hybrid_nano random init"]
    for entry in report["entries"]:
        assert 0.0 <= entry["knn"]["top1"] <= 1.0
        # k-NN: all 370 images are queries (leave-one-out); the 111-image held-out result is kept beside it
        assert entry["knn"]["protocol"] == "leave_one_out" and entry["knn"]["n_test"] == 370
        assert entry["knn"]["heldout"]["n_test"] == 111
        # k-shot: 10 draws from all 370 images, each scored on every image it did not draw
        assert {r["shots"]: r["n_test"] for r in entry["fewshot"]} == {1: 370 - 37, 5: 370 - 185}
        assert all(r["method"] == "linear" and len(r["runs"]) == 10 for r in entry["fewshot"])
    assert "| hybrid_nano pretrained (3 steps) |" in printed and "report.md" in printed
    assert f"model:  {run / 'model'} " in printed  # the model the README's tour goes on with
    for name in ("report.md", "report.json", "label_efficiency.png", "model/model.safetensors", "config.yaml",
                 "metrics.jsonl", "quickstart_split.json"):
        assert (run / name).exists(), name
    assert (run / "label_efficiency.png").read_bytes()[:8] == PNG_MAGIC
    card = (run / "model" / "README.md").read_text()
    assert "## Evaluation" in card and "| hybrid_nano pretrained (3 steps) |" in card  # the report's table
    assert len(list(run.glob("retrieval_*.png"))) == 2
    split = json.loads((run / "quickstart_split.json").read_text())
    assert len(split["ids"]) == 37 * 3  # 3 test images of each of the 37 breeds
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    # the report says what the numbers mean, and the verdict printed last is the report's
    context = report["context"]
    assert context["chance"]["top1"] == pytest.approx(1 / 37) and context["test_images_in_train"] == 0
    assert "disjoint parts of" in context["split"] and "held out at random (seed 0" in context["split"]
    assert context["protocol"]["fewshot"]["shots"] == [1, 5] and context["protocol"]["fewshot"]["seeds"] == 10
    assert context["protocol"]["fewshot"]["protocol"] == "rest"
    assert context["protocol"]["knn"]["protocol"] == "leave_one_out"
    assert "every labeled image (train and test) is a query, the other 369" in (run / "report.md").read_text()
    assert report["entries"][0]["budget"].startswith("3 of 3 steps in ")
    assert "whichever comes first; stopped: all steps done" in report["entries"][0]["budget"]
    assert report["verdict"]["baseline"] == "hybrid_nano random init"
    assert printed.rstrip().splitlines()[-1] == f"verdict: {report['verdict']['line']}"
    assert f"**Verdict:** {report['verdict']['line']}" in (run / "report.md").read_text()
    # the pretrained backbone really is the run's export, not a second random init
    pretrained, random_init = (entry["backbone"]["hash"] for entry in report["entries"])
    assert pretrained != random_init


def test_quickstart_rejects_a_bad_budget(capsys, tmp_path):
    assert main(["quickstart", "--minutes", "0", "--output-dir", str(tmp_path)]) == 2
    assert "--minutes" in capsys.readouterr().err


def test_help_summary_names_model_objectives_steps_and_size(tmp_path, monkeypatch):
    from ssl_hybrid import quickstart

    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text("model: {name: hybrid_tiny}\ndata: {image_size: 96}\ntrain: {steps: 200}\n"
                      "objective: {mim_weight: 1.0, dino_weight: 0.5, simclr_weight: 0.0}\n")
    monkeypatch.setattr(quickstart, "QUICKSTART_RECIPE", recipe)
    assert quickstart.recipe_summary() == "hybrid_tiny with MIM + DINO (200 steps at 96 px)"


def test_help_summary_survives_a_broken_recipe(tmp_path, monkeypatch):
    from ssl_hybrid import quickstart

    assert "steps at" in quickstart.recipe_summary()  # the recipe on disk, summarized
    broken = tmp_path / "quickstart.yaml"
    broken.write_text("train: [1, 2\n")
    monkeypatch.setattr(quickstart, "QUICKSTART_RECIPE", broken)
    assert quickstart.recipe_summary() == "the model and objective of recipes/quickstart.yaml"


def _online_knn_beyond_noise_step(metrics_file) -> int:
    """The first monitored step whose online k-NN (leave-one-out, the report's k-NN protocol) is beyond noise
    above step 0's (the random init) by the verdict's rule."""
    from ssl_hybrid.eval.verdict import binomial_se

    knn = [json.loads(line) for line in metrics_file.read_text().splitlines() if '"knn_top1"' in line]
    start = knn[0]
    for record in knn:
        se = (binomial_se(record["knn_top1"], record["knn_n_test"]) ** 2
              + binomial_se(start["knn_top1"], start["knn_n_test"]) ** 2) ** 0.5
        if record["knn_top1"] - start["knn_top1"] > 2 * se:
            return record["step"]
    raise AssertionError(f"{metrics_file}: the online k-NN never left noise")


def test_reference_steps_are_where_the_committed_run_left_noise():
    from ssl_hybrid.config import REPO_ROOT
    from ssl_hybrid.quickstart import REFERENCE_RUN, REFERENCE_STEPS

    assert _online_knn_beyond_noise_step(REPO_ROOT / REFERENCE_RUN / "metrics.jsonl") == REFERENCE_STEPS


@pytest.mark.fault(injected="a loaded machine: the 8-minute budget fits 55 of the recipe's 400 steps",
                   did="the last printed line (and report.md/json via budget_note) says 55 of 400 steps fit, "
                       "8.4 s/step after 24 s of start-up, and that --minutes 23 fits the 156 steps the reference "
                       "run needed",
                   lost="nothing; before, a 'do not differ beyond noise' verdict read as if pretraining did not help")
def test_a_run_the_budget_cut_short_says_so_last(tmp_path, capsys, monkeypatch):
    from ssl_hybrid import quickstart
    from ssl_hybrid.eval import report as report_module
    from ssl_hybrid.train import engine

    summary = {"run_dir": str(tmp_path), "step": 55, "steps": 400, "max_seconds": 480.0, "stopped": "max_seconds",
               "start_step": 0, "train_seconds": 480.0, "startup_seconds": 24.0, "backbone": str(tmp_path / "backbone.safetensors")}
    monkeypatch.setattr(engine, "pretrain", lambda config, fresh=False: dict(summary))
    monkeypatch.setattr(quickstart, "split_corpus", lambda spec, seed, directory: (None, None))
    passed = {}

    def fake_report(*args, budget_note=None, **kwargs):
        passed["note"] = budget_note
        return {"table": "", "markdown": "report.md", "plot": "plot.png", "entries": [], "budget_note": budget_note,
                "verdict": {"line": "x and y do not differ beyond noise on any of 3 metrics."}}

    monkeypatch.setattr(report_module, "build_report", fake_report)
    assert main(["-q", "quickstart", "--output-dir", str(tmp_path)]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == f"note: {passed['note']}"
    assert "only 55 of 400 steps fit in 8 min" in last and "(8.4 s/step after 24 s of start-up)" in last
    assert "needed 156 steps" in last and "--minutes 23`" in last  # ceil((24 s + 156 x 8.44 s) / 60)
    # a first step that ate the whole budget (start-up) gives no step time to extrapolate from
    only_startup = quickstart.too_few_steps(dict(summary, step=1, train_seconds=20.3, startup_seconds=20.3))
    assert "(start-up and the first step: 20 s)" in only_startup and "--minutes" in only_startup
    # not flagged: enough steps, or a run the user asked to be short (the machine did not cut it)
    assert quickstart.too_few_steps(dict(summary, step=156)) is None
    assert quickstart.too_few_steps(dict(summary, steps=55, stopped="done")) is None


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.fault(injected="`quickstart --fresh` under `torchrun --nproc_per_node 2` (gloo on CPU) over an image folder",
                   did="rank 0 alone removes the old run, writes the split and the report and prints them; the other "
                       "rank helps train and extract, then exits 0; the folder is sharded once per node",
                   lost="nothing (every rank deleted the run, one of them possibly after another had started it; the "
                        "rank without the export stopped with 'interrupted before the export'; each rank sharded)")
def test_quickstart_under_torchrun_rank_0_owns_deletes_and_the_report(tmp_path, image_folder, free_port):
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    old = tmp_path / "quickstart"
    old.mkdir()
    (old / "config.yaml").write_text("name: quickstart\ntrain: {steps: 2}\n")  # an earlier run that --fresh replaces
    (old / "old_marker").write_text("old")
    overrides = [o for o in TINY if not o.startswith(("train.steps", "train.knn_every"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port), "-m", "ssl_hybrid", "quickstart", "--minutes", "1", "--output-dir",
           str(tmp_path), "--fresh", *overrides, "train.steps=2", "train.knn_every=0", f"data.train={image_folder}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("--fresh: removed") == 1 and not (old / "old_marker").exists()
    assert proc.stderr.count("sharding image folder") == 1, proc.stderr[-4000:]
    assert proc.stdout.count("verdict: ") == 1  # printed by rank 0 only
    report = json.loads((old / "report.json").read_text())
    assert [e["name"] for e in report["entries"]] == ["hybrid_nano pretrained (2 steps)", "hybrid_nano random init"]
    assert len(json.loads((old / "quickstart_split.json").read_text())["ids"]) == 3 * 2
