"""Probe one objective setting on flowers12 at the label-efficiency budget: pretrain with config overrides for
a fixed CPU-time budget (1 torch thread, calibrated like ``label_efficiency.py``), then k-NN top-1 and 1/10-shot
linear probes (5 seeds) on the test split. Appends one JSON line per run to ``--results``.

Used to search for objective settings before a full ``label_efficiency.py`` run, e.g.

    OMP_NUM_THREADS=1 python benchmarks/objective_probe.py simclr_hybrid model.name=hybrid_tiny \
        data.views=simclr objective.mim_weight=0 objective.dino_weight=0 objective.simclr_weight=1 --lr 5e-3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_efficiency as le  # noqa: E402  (the benchmark's calibration and pretraining, reused)

from ssl_hybrid.config import REPO_ROOT  # noqa: E402
from ssl_hybrid.runs import read_metrics  # noqa: E402


def evaluate(run: Path, data: Path, image_size: int) -> dict:
    """k-NN top-1 and 1/10-shot linear probes, through the report's per-backbone evaluation."""
    from ssl_hybrid.data.labeled import align_classes, load_labeled
    from ssl_hybrid.eval.features import features_for_spec
    from ssl_hybrid.eval.report import evaluate_backbone

    train = load_labeled(data / "train")
    test = align_classes(train, load_labeled(data / "test"))
    result = {}
    for pooling in ("default", "multiscale"):
        meta, (train_features, test_features) = features_for_spec(str(run), [train, test], image_size=image_size,
                                                                  batch_size=64, pooling=pooling)
        entry = evaluate_backbone(str(run), meta, train_features, test_features, shots=(1, 10), seeds=5,
                                  methods=("linear",), train_set=train, split_dir=None,
                                  num_classes=len(train.classes))
        suffix = "" if pooling == "default" else "_ms"
        result.update({f"knn{suffix}": round(100 * entry["knn"]["top1"], 1),
                       **{f"{r['shots']}shot{suffix}": round(100 * r["mean"], 1) for r in entry["fewshot"]}})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="run name (also the results label)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for this setting")
    parser.add_argument("--minutes", type=float, default=4.0, help="pretraining budget in CPU-minutes")
    parser.add_argument("--lr", type=float, default=5e-3, help="optim.lr (per 256 images)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "flowers12")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "objective_probe")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "runs" / "objective_probe" / "results.jsonl")
    a = parser.parse_intermixed_args()
    args = argparse.Namespace(data=a.data, train_source=a.data / "train", image_size=a.image_size, batch_size=64,
                              seed=0, work_dir=a.work_dir, calibration_steps=6, minutes=a.minutes, steps=0, jobs=1, threads=1)
    le.METHODS[a.name] = (a.name, a.overrides)
    le.init_worker(args, a.name)  # import/JIT costs stay out of the calibration
    summary = le.pretrain_job(a.name, a.lr, le.calibrate(a.name, args), args)
    rows = [r for r in read_metrics(Path(summary["run_dir"])) if "loss" in r]
    result = {"name": a.name, "overrides": a.overrides, "lr": a.lr, "steps": summary["step"],
              "cpu_seconds": round(summary["cpu_seconds"]), **evaluate(Path(summary["run_dir"]), a.data, a.image_size),
              "last_losses": {k: round(v, 3) for k, v in rows[-1].items()
                              if k in ("mim", "dino", "simclr", "embedding_std")} if rows else {}}
    print(json.dumps(result))
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a", encoding="utf-8") as out:
        out.write(json.dumps(result) + "\n")
    shutil.rmtree(Path(summary["run_dir"]), ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
