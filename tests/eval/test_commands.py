"""The knn / linear / fewshot / finetune / report subcommands: --out JSON, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from ssl_hybrid.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_train_folder_is_one_line_and_exit_2(labeled_pair, capsys, tmp_path):
    code, out, err = _run(capsys, "knn", "random:resnet10t", "--train", str(tmp_path / "nope"),
                          "--test", str(labeled_pair[1]))
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "--train" in err and "not found" in err


@pytest.mark.parametrize("extra, message", [
    ([], "--train is required"),
    (["--train", "{t}", "--test", "{v}", "--ks", "10,x"], "--ks"),
    (["--train", "{t}", "--test", "{v}", "--temperature", "0"], "--temperature"),
])
def test_bad_knn_arguments_are_user_errors(labeled_pair, capsys, extra, message):
    extra = [a.format(t=labeled_pair[0], v=labeled_pair[1]) for a in extra]
    code, _, err = _run(capsys, "knn", "random:resnet10t", *extra)
    assert code == 2 and message in err and err.strip().count("\n") == 0


def test_unknown_backbone_is_a_user_error(labeled_pair, capsys):
    code, _, err = _run(capsys, "knn", "random:not_a_model", "--train", str(labeled_pair[0]),
                        "--test", str(labeled_pair[1]))
    assert code == 2 and "unknown model" in err


@pytest.mark.fault(injected="`ssl-hybrid knn ... --out knn.json` run from a terminal",
                   did="prints one line with the result (top-1/top-5, k, T, bank and test sizes, backbone and size, "
                       "the --out file); the full JSON goes to --out only",
                   lost="nothing; before, a 60-line JSON dump buried the number")
def test_knn_command_prints_one_line_and_writes_the_documented_json(labeled_pair, capsys, tmp_path):
    out = tmp_path / "knn.json"
    code, stdout, _ = _run(capsys, "knn", "random:hybrid_nano", "--train", str(labeled_pair[0]), "--test",
                           str(labeled_pair[1]), "--image-size", "32", "--workers", "0", "--out", str(out))
    assert code == 0
    result = json.loads(out.read_text())
    assert stdout.count("\n") == 1 and stdout == (
        f"k-NN top-1 {100 * result['top1']:.1f}%, top-5 {100 * result['top5']:.1f}% (k=20, T=0.07, bank of 18; "
        f"9 test images; random:hybrid_nano at 32 px) -> {out}\n")
    assert set(result) >= {"top1", "top5", "k", "temperature", "n_train", "n_test", "seconds", "per_k"}
    assert (result["n_train"], result["n_test"], result["k"]) == (18, 9, 20)
    assert result["backbone"]["image_size"] == 32


def test_labeled_folders_are_checked_before_extraction(labeled_pair, capsys):
    train, test = labeled_pair
    common = ["--test", str(test), "--image-size", "32", "--workers", "1", "--no-cache"]
    (train / "class_0" / "img_000.png").write_bytes(b"junk")  # 1 of 18: skipped and counted
    code, out, err = _run(capsys, "knn", "random:hybrid_nano", "--train", str(train), *common,
                          "--out", str(train.parent / "knn.json"))
    assert code == 0
    result = json.loads((train.parent / "knn.json").read_text())
    assert result["n_train"] == 17 and result["train_images"] == 17
    assert [item["id"] for item in result["skipped_unreadable"]["train"]] == ["class_0/img_000.png"]
    assert "class_0/img_000.png" in err  # the warning names the file
    (train / "class_1" / "img_000.png").write_bytes(b"junk")  # 2 of 18 > data.max_skip_rate: stop before extracting
    code, out, err = _run(capsys, "knn", "random:hybrid_nano", "--train", str(train), *common)
    assert code == 2 and out == "" and err.strip().count("\n") == 0
    assert "2 of 18 images are unreadable" in err and "class_0/img_000.png" in err and "Traceback" not in err


def test_a_folder_of_anything_is_one_line(capsys, tmp_path, labeled_pair):
    """What `knn RUN --train /tmp --test /tmp` meets: sub-folders of logs, caches and broken files."""
    for folder, name, data in (("logs", "run.log", b"text"), ("cache", "x.npz", b"PK"), ("pics", "a.jpg", b"oops")):
        (tmp_path / "any" / folder).mkdir(parents=True)
        (tmp_path / "any" / folder / name).write_bytes(data)
    code, out, err = _run(capsys, "knn", "random:hybrid_nano", "--train", str(tmp_path / "any"), "--test",
                          str(labeled_pair[1]), "--workers", "2", "--no-cache")
    *warnings, error = err.strip().splitlines()
    assert code == 2 and out == "" and "Traceback" not in err
    assert error.startswith("ssl-hybrid knn: error: ") and "1 of 1 images are unreadable" in error
    assert "pics/a.jpg" in error
    assert len(warnings) == 1 and "class folders 'cache', 'logs' hold no images: left out" in warnings[0]


def test_test_images_that_are_training_images_are_flagged(labeled_pair, capsys):
    out = labeled_pair[0].parent / "knn.json"
    code, _, err = _run(capsys, "knn", "random:hybrid_nano", "--train", str(labeled_pair[0]), "--test",
                        str(labeled_pair[0]), "--image-size", "32", "--workers", "0", "--no-cache", "--out", str(out))
    assert code == 0 and json.loads(out.read_text())["test_images_in_train"] == 18 and "inflated" in err


@pytest.mark.slow
def test_fewshot_linear_and_finetune_commands(labeled_pair, capsys, tmp_path):
    common = ["--train", str(labeled_pair[0]), "--test", str(labeled_pair[1]), "--image-size", "32", "--workers", "0"]
    code, printed, _ = _run(capsys, "fewshot", "random:resnet10t", *common, "--shots", "1,2", "--seeds", "2",
                            "--method", "knn,linear", "--out", str(tmp_path / "fs.json"))
    assert code == 0
    result = json.loads((tmp_path / "fs.json").read_text())
    first = result["results"][0]
    assert printed.count("\n") == 1 and printed.startswith(
        f"knn 1-shot {100 * first['mean']:.1f} ± {100 * first['std']:.1f}%, linear 1-shot ")
    assert "mean ± std over 2 draws; 9 test images; random:resnet10t at 32 px)" in printed
    assert [(r["method"], r["shots"], len(r["runs"])) for r in result["results"]] == \
           [("knn", 1, 2), ("linear", 1, 2), ("knn", 2, 2), ("linear", 2, 2)]
    assert sorted(p.name for p in (tmp_path / "fs_splits").iterdir()) == \
           ["shots1_seed0.json", "shots1_seed1.json", "shots2_seed0.json", "shots2_seed1.json"]

    code, printed, _ = _run(capsys, "linear", "random:resnet10t", *common, "--out", str(tmp_path / "lin.json"))
    linear = json.loads((tmp_path / "lin.json").read_text())
    assert code == 0 and printed.count("\n") == 1 and f"(C={linear['C']:g}, held-out " in printed

    code, _, _ = _run(capsys, "finetune", "random:resnet10t", *common, "--epochs", "2", "--batch-size", "8",
                      "--shots", "4", "--out", str(tmp_path / "ft.json"))
    assert code == 0
    finetuned = json.loads((tmp_path / "ft.json").read_text())
    assert finetuned["shots"] == 4 and finetuned["n_train"] + finetuned["n_val"] == 12
    assert len(json.loads((tmp_path / "ft_split.json").read_text())["ids"]) == 12
    # the best model is kept: a model folder beside --out with the class names, scoring what finetune scored
    from ssl_hybrid.data.labeled import align_classes, load_labeled
    from ssl_hybrid.eval.features import eval_transform, extract_features, make_loader
    from ssl_hybrid.eval.knn import topk_accuracy
    from ssl_hybrid.models import load_model

    assert finetuned["model"] == str(tmp_path / "ft_model")
    model, config = load_model(tmp_path / "ft_model")
    train_set = load_labeled(str(labeled_pair[0]))
    assert config["label_names"] == list(train_set.classes) and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    test_set = align_classes(train_set, load_labeled(str(labeled_pair[1])))
    logits, labels = extract_features(model, make_loader(test_set, eval_transform(32), 8, 0),
                                      forward=lambda m, x: m(x))
    assert topk_accuracy(logits, labels, 1) == finetuned["top1"]
    code, _, err = _run(capsys, "finetune", "random:resnet10t", *common, "--epochs", "1", "--save",
                        str(tmp_path / "ft_model"))
    assert code == 2 and "already exists; pass --force" in err  # refused before training, the model kept

    code, _, err = _run(capsys, "fewshot", "random:resnet10t", *common, "--shots", "9")
    assert code == 2 and "fewer than 9 shots" in err
    # --fewshot-protocol rest: 9 images per class in train + test together, so 8 shots fit
    code, _, _ = _run(capsys, "fewshot", "random:resnet10t", *common, "--shots", "8", "--seeds", "2", "--method",
                      "knn", "--fewshot-protocol", "rest", "--out", str(tmp_path / "rest.json"))
    rest = json.loads((tmp_path / "rest.json").read_text())
    assert code == 0 and rest["protocol"] == "rest" and rest["results"][0]["n_test"] == 27 - 24


def test_report_command_checks_names(labeled_pair, capsys, tmp_path):
    code, _, err = _run(capsys, "report", "random:resnet10t", "random:hybrid_nano", "--names", "only_one",
                        "--train", str(labeled_pair[0]), "--test", str(labeled_pair[1]))
    assert code == 2 and "--names" in err


@pytest.mark.slow
@pytest.mark.distributed
def test_knn_under_two_processes_matches_one(labeled_pair, capsys, tmp_path, free_port):
    import os
    import subprocess
    import sys

    common = ["random:resnet10t", "--train", str(labeled_pair[0]), "--test", str(labeled_pair[1]), "--image-size", "32",
              "--workers", "0", "--batch-size", "4", "--no-cache"]
    assert main(["knn", *common, "--out", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port), "-m", "ssl_hybrid", "knn", *common, "--out", str(tmp_path / "two.json")],
                          env=env, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (two["n_train"], two["n_test"]) == (18, 9)  # padded duplicates trimmed
    assert two["per_k"] == one["per_k"]
    assert done.stdout.count("k-NN top-1") == 1  # only rank 0 prints


def test_knn_reads_labeled_shards_like_folders(labeled_pair, capsys, tmp_path):
    from ssl_hybrid.data.shards import write_shards

    write_shards(labeled_pair[0], tmp_path / "train_shards", shard_size=7, progress=False)
    common = ["random:resnet10t", "--test", str(labeled_pair[1]), "--image-size", "32", "--workers", "0"]
    assert main(["knn", *common, "--train", str(labeled_pair[0]), "--out", str(tmp_path / "folder.json")]) == 0
    assert main(["knn", *common, "--train", str(tmp_path / "train_shards"), "--out", str(tmp_path / "shards.json")]) == 0
    capsys.readouterr()
    folder, shards = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("folder", "shards"))
    assert shards["n_train"] == folder["n_train"] == 18
    # Same images (PNG bytes kept as written), same labels: the bank is a permutation, so the accuracies agree.
    assert shards["per_k"] == folder["per_k"]


def test_report_baseline_must_name_a_backbone(labeled_pair, capsys, tmp_path):
    code, _, err = _run(capsys, "report", "random:hybrid_nano", "random:resnet10t", "--names", "a,b",
                        "--baseline", "c", "--train", str(labeled_pair[0]), "--test", str(labeled_pair[1]),
                        "--out-dir", str(tmp_path / "r"))
    assert code == 2 and "--baseline 'c' is not one of the backbone names (a, b)" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_report_knn_protocol_leave_one_out_queries_train_and_test(labeled_pair, capsys, tmp_path):
    code, _, _ = _run(capsys, "report", "random:resnet10t", "--train", str(labeled_pair[0]), "--test",
                      str(labeled_pair[1]), "--image-size", "32", "--workers", "0", "--shots", "1", "--seeds", "1",
                      "--method", "knn", "--knn-protocol", "leave_one_out", "--out-dir", str(tmp_path / "r"))
    assert code == 0
    entry = json.loads((tmp_path / "r" / "report.json").read_text())["entries"][0]
    assert entry["knn"]["protocol"] == "leave_one_out" and entry["knn"]["n_test"] == 18 + 9
    assert entry["knn"]["heldout"]["n_test"] == 9 and entry["fewshot_n_test"] == 9
