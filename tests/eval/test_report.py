"""Report: markdown table, JSON, label-efficiency plot and retrieval grid (valid PNGs, correct colours), and
what the report says about its numbers (chance, split, shots x seeds, budget, verdict)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ssl_hybrid.data.labeled import load_labeled
from ssl_hybrid.eval.report import (
    CORRECT,
    LEGEND,
    QUERY,
    WRONG,
    _font,
    build_report,
    plot_label_efficiency,
    retrieval_grid,
    wrap_text,
)
from tests.eval.eval_helpers import make_labeled_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _valid_png(path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_MAGIC
    Image.open(path).verify()
    return Image.open(path).convert("RGB")


@pytest.mark.slow
def test_report_compares_backbones_and_writes_valid_files(labeled_pair, tmp_path):
    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    out = tmp_path / "report"
    report = build_report(["random:resnet10t", "random:hybrid_nano"], train, test, out, names=["resnet", "hybrid"],
                          shots=(1, 2, 10), seeds=2, image_size=32, batch_size=16, grid_queries=4, baseline="resnet")
    assert [e["name"] for e in report["entries"]] == ["resnet", "hybrid"]
    table = (out / "report.md").read_text()
    assert "| resnet |" in table and "| hybrid |" in table and "knn 2-shot" in table and "linear 1-shot" in table
    saved = json.loads((out / "report.json").read_text())
    assert saved["entries"][0]["knn"]["k"] == 20 and len(saved["entries"][1]["fewshot"]) == 4
    plot = _valid_png(out / "label_efficiency.png")
    assert plot.size[0] > 300 and len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 10
    for name in ("resnet", "hybrid"):
        _valid_png(out / f"retrieval_{name}.png")
    assert len(list((out / "splits").glob("shots*_seed*.json"))) == 4


@pytest.mark.slow
def test_report_says_what_the_numbers_mean(labeled_pair, tmp_path):
    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    out = tmp_path / "report"
    build_report(["random:hybrid_nano"], train, test, out, names=["nano"], shots=(1, 2, 10), seeds=2,
                 methods=("knn",), image_size=32, batch_size=16, grid_queries=2)
    saved = json.loads((out / "report.json").read_text())
    context = saved["context"]
    assert context["chance"]["top1"] == pytest.approx(1 / 3) and context["num_classes"] == 3
    assert context["train"]["images"] == 18 and context["test"]["images"] == 9
    assert context["test_images_in_train"] == 0 and "separate sets" in context["split"]
    assert context["protocol"]["fewshot"] == {"methods": ["knn"], "shots": [1, 2], "seeds": 2, "protocol": "heldout",
                                              "skipped_shots": [10]}
    assert context["protocol"]["image_size"] == [32]
    assert saved["entries"][0]["budget"].startswith("random initialization")
    # no baseline among a single random backbone: the verdict judges it against chance only
    assert saved["verdict"]["baseline"] is None and "chance level (33.3%)" in saved["verdict"]["line"]
    markdown = (out / "report.md").read_text()
    assert f"**Verdict:** {saved['verdict']['line']}" in markdown
    assert "| chance (3 classes) | 33.3 |" in markdown and "× 2 seeded draws" in markdown
    assert "10-shot skipped" in markdown and "32 px" in markdown
    chance_lines = [line for line in saved["plot_data"]["lines"] if line["label"].startswith("chance")]
    assert chance_lines and chance_lines[0]["y"][0] == pytest.approx(100 / 3)


def test_report_notices_test_images_that_are_training_images(labeled_pair, tmp_path):
    from ssl_hybrid.eval.verdict import data_context

    train = load_labeled(labeled_pair[0])
    context = data_context(train, train.subset(range(0, 18, 2)))
    assert context["test_images_in_train"] == 9 and "inflated" in context["split"]
    disjoint = data_context(train.subset(range(1, 18, 2)), train.subset(range(0, 18, 2)), "held out per class")
    assert disjoint["test_images_in_train"] == 0
    assert "disjoint parts" in disjoint["split"] and disjoint["split"].endswith("held out per class")


def _fewshot_entries():
    entries = []
    for name, base in (("pretrained", 0.40), ("random", 0.20)):
        rows = [{"method": "linear", "shots": k, "mean": base + 0.02 * k, "std": 0.03,
                 "runs": [{"seed": s} for s in range(3)]} for k in (1, 2, 5, 10)]
        entries.append({"name": name, "fewshot": rows, "knn": {"top1": base, "k": 20, "n_test": 200}})
    return entries


def test_label_efficiency_plot_has_chance_line_zero_based_axis_seeds_and_every_shot(tmp_path):
    data = plot_label_efficiency(_fewshot_entries(), tmp_path / "plot.png", chance=0.1, seeds=3)
    _valid_png(tmp_path / "plot.png")
    assert data["ylim"][0] == 0 and data["ylim"][1] >= 100 * (0.60 + 0.03)  # the top of the highest band shows
    assert data["xticks"] == [1, 2, 5, 10] and data["xticklabels"] == ["1", "2", "5", "10"]
    assert "3 seeds" in data["title"]
    chance = [line for line in data["lines"] if line["label"] == "chance (10.0%)"]
    assert len(chance) == 1 and set(chance[0]["y"]) == {10.0} and chance[0]["linestyle"] == ":"
    curves = {line["label"]: line["y"] for line in data["lines"] if "linear" in line["label"]}
    assert curves["random · linear"] == pytest.approx([22, 24, 30, 40])
    assert "chance (10.0%)" in data["legend"]


def _entry(name, kind, knn, n_test=200, fewshot=()):
    return {"name": name, "backbone": {"kind": kind}, "knn": {"top1": knn, "k": 20, "n_test": n_test},
            "fewshot": [{"method": "linear", "shots": k, "mean": m, "std": s, "runs": [{}] * seeds}
                        for k, m, s, seeds in fewshot]}


def test_verdict_is_computed_from_the_numbers():
    from ssl_hybrid.eval.verdict import verdict

    chance = 1 / 37
    better = verdict([_entry("ours", "file", 0.30, fewshot=[(5, 0.25, 0.01, 5)]),
                      _entry("init", "random", 0.10, fewshot=[(5, 0.24, 0.01, 5)])], chance)
    assert better["baseline"] == "init" and better["outcomes"] == {"ours": "better"}
    assert better["line"].startswith("ours beats init beyond noise on 1 of 2 metrics")
    assert "+20.0 points, beyond noise" in better["line"] and "+1.0 points, within noise" in better["line"]
    assert "Both are beyond noise above chance level (2.7%)" in better["line"]
    same = verdict([_entry("ours", "file", 0.12), _entry("init", "random", 0.10)], chance)
    assert same["outcomes"] == {"ours": "within noise"} and "do not differ beyond noise" in same["line"]
    worse = verdict([_entry("ours", "file", 0.03), _entry("init", "random", 0.20)], chance)
    assert worse["outcomes"] == {"ours": "worse"} and "ours is worse than init" in worse["line"]
    assert "ours is within noise of chance level" in worse["line"]
    at_chance = verdict([_entry("ours", "file", 0.036, n_test=111), _entry("init", "random", 0.027, n_test=111)],
                        chance)
    assert "Both are within noise of chance level (2.7%) on every metric" in at_chance["line"]
    assert "\n" not in at_chance["line"]


def test_noise_is_the_larger_of_seed_spread_and_test_set_size():
    from ssl_hybrid.eval.verdict import binomial_se, metrics

    spread = metrics(_entry("x", "file", 0.5, n_test=10_000, fewshot=[(1, 0.5, 0.2, 4)]))[1]
    assert spread["se"] == pytest.approx(0.2 / 2)  # std / sqrt(seeds) dominates on a big test set
    small = metrics(_entry("x", "file", 0.5, n_test=20, fewshot=[(1, 0.5, 0.0, 4)]))[1]
    assert small["se"] == pytest.approx(binomial_se(0.5, 20)) and small["se"] > 0.1
    assert binomial_se(0.0, 50) > 0  # a 0% accuracy on 50 images is not exact


def test_few_shot_noise_uses_the_few_shot_test_set_when_knn_scores_more_queries():
    """Leave-one-out k-NN scores every labeled image; the k-shot rows are scored on the test part only."""
    from ssl_hybrid.eval.verdict import binomial_se, metrics

    entry = {**_entry("x", "file", 0.1, n_test=370, fewshot=[(5, 0.1, 0.0, 5)]), "fewshot_n_test": 111}
    knn_row, shot_row = metrics(entry)
    assert knn_row["n_test"] == 370 and knn_row["se"] == pytest.approx(binomial_se(0.1, 370))
    assert shot_row["n_test"] == 111 and shot_row["se"] == pytest.approx(binomial_se(0.1, 111))


def test_report_with_the_rest_protocol_draws_shots_from_train_and_test(labeled_pair, tmp_path):
    from ssl_hybrid.eval.verdict import binomial_se, metrics

    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])  # 6 + 3 images per class
    out = tmp_path / "report"
    build_report(["random:hybrid_nano"], train, test, out, names=["nano"], shots=(1, 8, 10), seeds=2,
                 methods=("knn",), image_size=32, batch_size=16, grid_queries=2, knn_protocol="leave_one_out",
                 fewshot_protocol="rest")
    saved = json.loads((out / "report.json").read_text())
    assert saved["context"]["protocol"]["fewshot"]["protocol"] == "rest"
    assert saved["context"]["protocol"]["fewshot"]["skipped_shots"] == [10]  # 8-shot fits the 9 per class of both
    entry = saved["entries"][0]
    assert {r["shots"]: r["n_test"] for r in entry["fewshot"]} == {1: 27 - 3, 8: 27 - 24}
    rows = {m["metric"]: m for m in metrics(entry)}
    assert rows["knn_8shot"]["se"] >= binomial_se(rows["knn_8shot"]["value"], 3)
    markdown = (out / "report.md").read_text()
    assert "drawn from all 27 labeled images (train and test) × 2 seeded draws, each scored on every image" in markdown
    assert "the bank of the retrieval grids" in markdown
    with pytest.raises(ValueError, match="few-shot protocol"):
        build_report(["random:hybrid_nano"], train, test, out, fewshot_protocol="pooled")


def test_leave_one_out_knn_queries_every_image_and_keeps_the_heldout_result():
    from ssl_hybrid.eval.knn import knn_evaluate, leave_one_out_knn
    from ssl_hybrid.eval.report import evaluate_knn

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=90)
    features = (rng.normal(size=(90, 12)) + 1.2 * np.eye(12)[labels]).astype(np.float32)
    train, test = (features[:60], labels[:60]), (features[60:], labels[60:])
    heldout = evaluate_knn(train, test, 5)
    assert heldout["protocol"] == "heldout" and heldout["n_test"] == 30
    assert heldout["top1"] == knn_evaluate(*train, *test, num_classes=5)["top1"]
    loo = evaluate_knn(train, test, 5, protocol="leave_one_out")
    assert loo["protocol"] == "leave_one_out" and loo["n_test"] == 90 and loo["n_train"] == 89
    assert loo["top1"] == leave_one_out_knn(features, labels)["top1"]
    assert loo["heldout"]["top1"] == heldout["top1"] and loo["heldout"]["n_test"] == 30
    with pytest.raises(ValueError, match="unknown k-NN protocol 'both'"):
        evaluate_knn(train, test, 5, protocol="both")


def test_budget_says_steps_time_limit_and_why_training_stopped():
    from ssl_hybrid.eval.verdict import budget_text

    record = {"step": 180, "steps": 200, "max_seconds": 300.0, "stopped": "max_seconds", "start_step": 0,
              "train_seconds": 299.6, "objective": {"mim_weight": 1.0, "dino_weight": 0.0, "simclr_weight": 1.0}}
    text = budget_text({"kind": "file", "pretraining": record})
    assert text == ("180 of 200 steps in 5.0 min; budget 200 steps or 5.0 min, whichever comes first; "
                    "stopped: time budget spent; objective MIM + SimCLR")
    resumed = budget_text({"kind": "file", "pretraining": dict(record, start_step=150, train_seconds=40,
                                                                 max_seconds=0, stopped="done")})
    assert "steps 150→180 in 40 s after resuming" in resumed and "no time limit" in resumed
    assert budget_text({"kind": "random"}).startswith("random initialization")


def test_retrieval_grid_borders_are_green_when_right_and_red_when_wrong(labeled_pair, tmp_path):
    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    # Hand-made features: every query's nearest training image is index 0 (class 0), then index 17 (class 2).
    train_features = np.zeros((len(train), 4), dtype=np.float32)
    train_features[:, 3] = 1.0
    train_features[0] = [1, 0, 0, 0]
    train_features[17] = [0.9, 0.1, 0, 0]
    test_features = np.tile(np.array([[1, 0, 0, 0]], dtype=np.float32), (len(test), 1))
    info = retrieval_grid(train, test, train_features, test_features, tmp_path / "grid.png", queries=len(test),
                          neighbours=2, thumb=20, border=3)
    grid = np.asarray(_valid_png(tmp_path / "grid.png"))
    layout = info["layout"]
    cell, caption, header, gap = layout["cell"], layout["caption"], layout["header"], layout["gap"]
    assert cell == 26
    picked = np.sort(np.random.default_rng(0).choice(len(test), size=len(test), replace=False))
    for row, query in enumerate(picked):
        label = test.samples[query].label
        y = header + row * (cell + caption) + 1  # inside the top border band
        assert tuple(grid[y, 10]) == QUERY
        first, second = grid[y, cell + gap + 10], grid[y, 2 * cell + gap + 10]
        assert tuple(first) == (CORRECT if label == 0 else WRONG)
        assert tuple(second) == (CORRECT if label == 2 else WRONG)
    assert info["neighbour_precision"] == pytest.approx(2 / 6)  # 3 classes x 3 queries, each right once in 2


def test_retrieval_grid_has_title_legend_and_class_names_that_fit(tmp_path):
    from PIL import ImageDraw

    long_name = "staffordshire_bull_terrier_with_a_very_long_breed_name"
    root = make_labeled_folder(tmp_path / "set", 2, 4, seed=0)
    (root / "class_1").rename(root / long_name)
    labeled = load_labeled(root)
    features = np.random.default_rng(0).standard_normal((len(labeled), 8)).astype(np.float32)
    info = retrieval_grid(labeled, labeled, features, features, tmp_path / "grid.png", queries=3, neighbours=3,
                          title="my backbone: nearest training images")
    grid = np.asarray(_valid_png(tmp_path / "grid.png"))
    assert info["title"] == ["my backbone: nearest training images"]
    assert [item["label"] for item in info["legend"]] == [label for label, _ in LEGEND]
    for item in info["legend"]:  # each swatch is drawn in its colour, above the first row
        x0, y0, x1, y1 = item["box"]
        assert tuple(grid[(y0 + y1) // 2, (x0 + x1) // 2]) == tuple(item["color"])
        assert y1 < info["layout"]["header"]
    assert {tuple(item["color"]) for item in info["legend"]} == {QUERY, CORRECT, WRONG}
    draw, font, width = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(11), info["layout"]["cell"] - 4
    long_captions = [lines for row in info["captions"] for lines in row if lines[0].startswith("staffordshire")]
    assert long_captions, "the long class name was never drawn"
    for lines in (lines for row in info["captions"] for lines in row):
        assert 1 <= len(lines) <= 2 and all(draw.textlength(line, font=font) <= width for line in lines)
    assert long_captions[0][-1].endswith("…") and "_" not in " ".join(long_captions[0])


def test_wrap_text_breaks_at_spaces_and_cuts_words_longer_than_a_line():
    from PIL import ImageDraw

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(11)
    assert wrap_text(draw, "basset hound", font, 200) == ["basset hound"]
    lines = wrap_text(draw, "english cocker spaniel", font, 70)
    assert len(lines) == 2 and " ".join(lines).replace("…", "").startswith("english cocker")
    cut = wrap_text(draw, "x" * 80, font, 60, max_lines=3)
    assert len(cut) == 3 and all(draw.textlength(line, font=font) <= 60 for line in cut)


def _saved_nano(folder, size: int) -> str:
    import timm
    import torch

    from ssl_hybrid.models.export import save_model_folder

    torch.manual_seed(size)
    save_model_folder(timm.create_model("hybrid_nano", num_classes=0, img_size=size).eval(), folder,
                      extra={"image_size": size})
    return str(folder)


@pytest.mark.fault(injected="`report RUN random:hybrid_nano` with RUN pretrained at 32 px and no --image-size",
                   did="the random init is evaluated at 32 px too (the report's image-size row reads '32 px' alone)",
                   lost="nothing; before, the baseline ran at 224 px and the gap mixed resolution with pretraining")
def test_random_baseline_is_evaluated_at_the_pretrained_size(labeled_pair, tmp_path, monkeypatch):
    from ssl_hybrid.eval import features

    class BothSizesKnown(Exception):
        pass

    extracted = []

    def record_size(spec, sets, image_size, *args, **kwargs):  # the size each backbone would be extracted at
        extracted.append(image_size)
        if len(extracted) == 2:
            raise BothSizesKnown
        return {"image_size": image_size}, [(np.eye(len(s), 8, dtype=np.float32), s.labels) for s in sets]

    monkeypatch.setattr(features, "features_for_spec", record_size)
    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])
    with pytest.raises(BothSizesKnown):  # image_size=None: what `ssl-hybrid report` passes without --image-size
        build_report([_saved_nano(tmp_path / "run", 32), "random:hybrid_nano"], train, test, tmp_path / "report",
                     shots=(1,), seeds=1, methods=("knn",), image_size=None, grid_queries=1)
    assert extracted == [32, 32]


@pytest.mark.fault(injected="a report of backbones pretrained at 32 and 48 px beside a random init, no --image-size",
                   did="exit 2 before any extraction, one line naming both sizes and --image-size",
                   lost="nothing (no report folder is written)")
def test_random_baseline_beside_two_pretrained_sizes_is_refused(labeled_pair, tmp_path, capsys):
    from ssl_hybrid.cli import main
    from ssl_hybrid.eval.report import image_sizes

    small, large = _saved_nano(tmp_path / "small", 32), _saved_nano(tmp_path / "large", 48)
    out = tmp_path / "report"
    code = main(["report", small, large, "random:hybrid_nano", "--train", str(labeled_pair[0]), "--test",
                 str(labeled_pair[1]), "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "32 px and 48 px" in err and "--image-size" in err
    assert not out.exists()
    assert image_sizes([small, large, "random:hybrid_nano"], 64) == [64, 64, 64]  # an explicit size applies to all
    assert image_sizes([small, large]) == [32, 48]  # pretrained backbones keep their own sizes


@pytest.mark.fault(injected="the quickstart's protocols: k-NN leave-one-out and k-shot 'rest' (every label a query)",
                   did="the report's test row says the held-out part only serves the retrieval grids and that the "
                       "columns score all the labeled images",
                   lost="nothing; before, the report named a 111-image test set while its numbers used all 370")
def test_report_test_row_names_what_the_numbers_were_scored_on(labeled_pair):
    from ssl_hybrid.eval.report import _setup_rows
    from ssl_hybrid.eval.verdict import data_context

    train, test = load_labeled(labeled_pair[0]), load_labeled(labeled_pair[1])

    def test_row(knn_protocol: str, fewshot_protocol: str) -> str:
        context = data_context(train, test)
        context["protocol"] = {"knn": {"k": 20, "temperature": 0.07, "bank": "…", "protocol": knn_protocol},
                               "fewshot": {"methods": ["linear"], "shots": [1], "seeds": 2,
                                           "protocol": fewshot_protocol, "skipped_shots": []},
                               "image_size": [32], "pooling": ["default"]}
        return dict(_setup_rows([], context))["test"]

    assert test_row("leave_one_out", "rest").startswith("9 images of")
    assert ("the queries of the retrieval grids only (the k-NN and k-shot columns score all 27 labeled images)"
            in test_row("leave_one_out", "rest"))
    assert "the k-NN queries and what the k-shot probes are scored on" in test_row("heldout", "heldout")
    assert "the k-NN queries;" in test_row("heldout", "rest")
