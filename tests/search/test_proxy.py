"""The real proxy: short pretraining through the trainer + FAISS k-NN, on a tiny image folder."""

from __future__ import annotations

import json

import pytest

from ssl_hybrid.cli import main
from ssl_hybrid.config import load_config
from ssl_hybrid.errors import UserError
from ssl_hybrid.search.proxy import KnnSets, PretrainKnnProxy, ProxyConfig, prepare_train_data

HANG_LIMIT_S = 1200  # a guard against a hung subprocess only, many times an idle machine's run
TINY_PRETRAIN = ["data.image_size=32", "data.local_image_size=32", "data.num_workers=0", "data.shuffle_buffer=8",
                 "train.batch_size=4", "train.checkpoint_every=0", "train.log_every=1",
                 "objective.dino_out_dim=64", "objective.decoder_dim=32", "objective.decoder_depth=1",
                 "objective.warmup_teacher_temp_steps=1"]


def test_knn_sets_split_and_cache(image_folder):
    sets = KnnSets(ProxyConfig(knn_train=str(image_folder), knn_shots=2))
    assert len(sets.train) == 3 * 2 and sets.num_classes == 3
    assert not set(sets.train.ids) & set(sets.test.ids)  # the bank never holds a query image
    first = sets.images("test", 32)
    assert first.shape == (len(sets.test), 3, 32, 32) and sets.images("test", 32) is first


def test_image_folder_becomes_shards_once(image_folder, tmp_path):
    proxy = ProxyConfig(train=str(image_folder), knn_train=str(image_folder))
    shards = prepare_train_data(proxy, tmp_path)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert shards == str(tmp_path / "shards") and sum(s["samples"] for s in manifest["shards"]) == 18
    stamp = (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns
    assert prepare_train_data(proxy, tmp_path) == shards
    assert (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns == stamp


@pytest.mark.fault(injected="a search whose proxy recipe sets data.channels=5 (the k-NN proxy decodes RGB images)",
                   did="refuses before converting or training anything, naming data.channels",
                   lost="nothing (no shards written)")
def test_an_n_channel_recipe_is_refused_before_anything_is_written(image_folder, tmp_path):
    proxy = ProxyConfig(train=str(image_folder), knn_train=str(image_folder), recipe_overrides=["data.channels=5"])
    with pytest.raises(UserError, match="data.channels = 5"):
        PretrainKnnProxy(proxy, tmp_path)
    assert not (tmp_path / "shards").exists()


@pytest.mark.slow
def test_cli_search_with_real_pretraining(image_folder, tmp_path, capsys):
    """2 candidates x 2 steps, then the better one x 4 steps: every score is a real k-NN accuracy."""
    recipe = tmp_path / "search.yaml"
    recipe.write_text(json.dumps({
        "name": "e2e", "output_dir": str(tmp_path / "searches"), "num_candidates": 2, "image_size": 32,
        "space": {"preset_size": "nano", "conv_type": ["convnext"], "conv_widths": [[8, 16]], "conv_depths": [[1, 1]], "embed_dim": [32, 64],
                  "depth": [1], "num_heads": [2], "attn_mode": ["global"], "token_keep_rate": [1.0]},
        "budget": {"repeats": 2, "warmup": 1},
        "zero_cost": {"batch_size": 4},
        "schedule": {"min_steps": 2, "eta": 2, "max_rungs": 2},
        "proxy": {"train": str(image_folder), "knn_train": str(image_folder), "overrides": TINY_PRETRAIN,
                  "recipe_overrides": ["objective.mim_weight=0", "objective.dino_weight=0",
                                       "objective.simclr_weight=1", "data.views=simclr"]},
    }))  # JSON is YAML
    assert main(["-q", "search", "-c", str(recipe)]) == 0
    out = tmp_path / "searches" / "e2e"
    summary = json.loads((out / "pareto.json").read_text())
    rows = {r["id"]: r for r in summary["rows"]}
    assert len(rows) == 2 and summary["chosen"] in rows
    for row in rows.values():
        assert 0.0 <= row["score_r0"] <= 1.0
    state = json.loads((out / "state.json").read_text())
    assert [r["steps"] for r in state["rungs"]] == [2, 4]
    for rung in state["rungs"]:
        for result in rung["scores"].values():
            run = out / "runs" / result["run_dir"].split("/")[-1]
            assert (run / "model" / "model.safetensors").exists() and not (run / "checkpoints").exists()
            assert "init_score" in result or rung["index"] > 0
    assert "k-NN top-1 init" in (out / "pareto.md").read_text()
    chosen_yaml = (out / "chosen.yaml").read_text()
    assert "arch:" in chosen_yaml and "ssl-hybrid pretrain" in chosen_yaml
    chosen = load_config(out / "chosen.yaml")  # trains on the searched data, with the recipe overrides kept
    assert chosen.data.train == str((out / "shards").resolve()) and chosen.data.val == str(image_folder.resolve())
    assert chosen.objective.simclr_weight == 1.0 and chosen.objective.mim_weight == 0.0
    assert chosen.data.image_size == 224  # proxy-only overrides (32 px) are not carried over
    assert summary["chosen"] in capsys.readouterr().out


def test_a_proxy_run_must_finish_its_steps():
    from types import SimpleNamespace

    from ssl_hybrid.search.proxy import IncompleteProxyRun, SearchInterrupted, check_finished

    config = SimpleNamespace(name="c1-r0", train=SimpleNamespace(steps=10))
    check_finished({"stopped": "done", "step": 10}, config)
    with pytest.raises(SearchInterrupted, match="resume"):
        check_finished({"stopped": "signal", "step": 4}, config)
    with pytest.raises(IncompleteProxyRun, match="max_seconds"):
        check_finished({"stopped": "max_seconds", "step": 7}, config)


@pytest.mark.fault(injected="SIGKILL from outside while a search trains its rung-1 candidate",
                   did="re-running resumes the search without re-scoring rung 0",
                   lost="nothing: the same scores as an uninterrupted search")
@pytest.mark.slow
def test_search_killed_mid_run_resumes(image_folder, tmp_path):
    """SIGKILL from outside while a rung-1 pretraining run is training, then the same command again:
    rung 0 is not re-run and the finished search matches one that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def write(name: str):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(json.dumps({
            "name": name, "output_dir": str(tmp_path / "searches"), "num_candidates": 2, "image_size": 32,
            "space": {"preset_size": "nano", "conv_type": ["convnext"], "conv_widths": [[8, 16]], "conv_depths": [[1, 1]], "embed_dim": [32, 64],
                      "depth": [1], "num_heads": [2], "attn_mode": ["global"], "token_keep_rate": [1.0]},
            "budget": {"repeats": 1, "warmup": 0}, "zero_cost": {"batch_size": 4},
            "schedule": {"min_steps": 2, "eta": 2, "max_rungs": 2},
            "proxy": {"train": str(image_folder), "knn_train": str(image_folder), "overrides": TINY_PRETRAIN,
                      "score_init": False}}))
        return recipe

    def search(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "ssl_hybrid", "search", "-c", str(write(name))],
                                env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    assert main(["-q", "search", "-c", str(write("straight"))]) == 0  # the reference, in this process
    killed = search("killed")
    runs_dir = tmp_path / "searches" / "killed" / "runs"
    # the loop ends when the run logs or ends; the limit only catches a hang (a loaded machine is slow)
    deadline = time.monotonic() + HANG_LIMIT_S
    # rung-0 runs have 2 steps; the rung-1 run (4 steps) is killed once it has logged a step
    while not any(m.stat().st_size for m in runs_dir.glob("*-r1/metrics.jsonl")):
        assert killed.poll() is None, f"the search ended before rung 1 trained: {killed.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "searches" / "killed" / "state.json").read_text())
    rung0 = state["rungs"][0]["scores"]
    assert len(rung0) == 2 and not state["rungs"][1]["scores"]
    resumed = search("killed")
    _, stderr = resumed.communicate(timeout=HANG_LIMIT_S)
    assert resumed.returncode == 0, stderr[-2000:]
    assert "rung 0: scoring" not in stderr and "rung 1: scoring" in stderr
    final = json.loads((tmp_path / "searches" / "killed" / "state.json").read_text())
    reference = json.loads((tmp_path / "searches" / "straight" / "state.json").read_text())
    assert final["rungs"][0]["scores"] == rung0
    for mine, ref in zip(final["rungs"], reference["rungs"]):  # same data order and seeds: same k-NN scores
        assert {c: r["score"] for c, r in mine["scores"].items()} == {c: r["score"] for c, r in ref["scores"].items()}


@pytest.mark.slow
def test_time_budget_calibrates_each_candidate_with_real_pretraining(image_folder, tmp_path):
    """schedule.min_seconds: each candidate (and the preset reference) is timed by real 1- and 3-step runs, then
    trains round(seconds / its CPU seconds per step) steps; the timing runs leave nothing behind."""
    from ssl_hybrid.search.run import load_search_config, run_search

    config = load_search_config(None, [
        "name=timed", f"output_dir={tmp_path}", "num_candidates=2", "image_size=32", "references=[resvit_nano]",
        "space.preset_size=nano", "space.conv_type=[resnet,convnext]", "space.conv_widths=[[8,16]]",
        "space.conv_depths=[[1,1]]", "space.embed_dim=[32]", "space.depth=[1]", "space.num_heads=[2]",
        "space.attn_mode=[global]", "space.token_keep_rate=[1.0]", "budget.repeats=1", "budget.warmup=0",
        "zero_cost.enabled=false", "schedule.min_seconds=0.5", "schedule.max_rungs=1", "proxy.calibration_steps=3",
        f"proxy.train={image_folder}", f"proxy.knn_train={image_folder}", "proxy.score_init=false",
        f"proxy.overrides=[{','.join(TINY_PRETRAIN)}]",
        "proxy.recipe_overrides=[objective.mim_weight=0,objective.dino_weight=0,objective.simclr_weight=1,data.views=simclr]",
    ])
    run_search(config)
    state = json.loads((config.out_dir() / "state.json").read_text())
    assert len(state["step_seconds"]) == 3 and all(v > 0 for v in state["step_seconds"].values())
    scores = state["rungs"][0]["scores"]
    assert set(scores) == set(state["order"])  # both candidates and the reference
    for cid, result in scores.items():
        assert result["steps"] == max(1, round(0.5 / state["step_seconds"][cid])) and 0 <= result["score"] <= 1
        assert result["train_cpu_seconds"] > 0
    assert not list((config.out_dir() / "runs").glob("*calib*"))
