"""The multi-channel demonstration, measured: the same pretraining + k-NN on the 16-bit, 5-channel demo set
(``data.channels=5``) and on its 8-bit RGB composites (the RGB path), plus k-NN on raw normalised pixels and on
a randomly initialised backbone as references. Writes ``benchmarks/results/microscopy_demo/microscopy_demo.json``.

    python benchmarks/microscopy_demo.py          # about 15 minutes on the 2-core VM

Every step is the CLI a user runs (``make-demo``, ``shards``, ``pretrain -c recipes/microscopy_demo.yaml``, ``knn``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ssl_hybrid.config import REPO_ROOT
from ssl_hybrid.machine import machine_info

RECIPE = REPO_ROOT / "recipes" / "microscopy_demo.yaml"
OUT = REPO_ROOT / "benchmarks" / "results" / "microscopy_demo" / "microscopy_demo.json"


def cli(*args: str) -> str:
    command = [sys.executable, "-m", "ssl_hybrid", "-q", *args]
    print("$ ssl-hybrid " + " ".join(args), flush=True)
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-3000:]}")
    return done.stdout


def knn(backbone: str, train: str, test: str, work: Path, name: str) -> dict:
    out = work / f"knn_{name}.json"
    cli("knn", backbone, "--train", train, "--test", test, "--no-cache", "--out", str(out))
    return json.loads(out.read_text())


def pixel_knn(train: str, test: str, arrays: bool) -> float:
    """k-NN (k=20, T=0.07) on the evaluators' preprocessed pixels themselves: what the data allows at all."""
    from ssl_hybrid.data.channels import manifest_normalization
    from ssl_hybrid.data.labeled import load_labeled
    from ssl_hybrid.data.shards import read_manifest
    from ssl_hybrid.eval.features import eval_transform
    from ssl_hybrid.eval.knn import knn_evaluate

    def pixels(spec: str):
        labeled = load_labeled(spec)
        if arrays:
            from ssl_hybrid.data.channels import ArrayEvalTransform

            norm = manifest_normalization(read_manifest(train))
            transform = ArrayEvalTransform(32, norm, 0.875)
            rows = [transform(labeled.load_array(i)).flatten().numpy() for i in range(len(labeled))]
        else:
            transform = eval_transform(32)
            rows = [transform(labeled.load_image(i)).flatten().numpy() for i in range(len(labeled))]
        return np.stack(rows).astype(np.float32), labeled.labels

    bank, bank_labels = pixels(train)
    queries, labels = pixels(test)
    return float(knn_evaluate(bank, bank_labels, queries, labels)["top1"])


def random_folder(work: Path, shards: str) -> str:
    """resvit_nano with random weights (seed 0), exported with the 5-channel normalisation: the no-pretraining row."""
    import torch

    import ssl_hybrid.models  # noqa: F401
    from ssl_hybrid.data.channels import manifest_normalization
    from ssl_hybrid.data.shards import read_manifest
    from ssl_hybrid.models.export import save_model_folder
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(0)
    model = create_backbone("resvit_nano", 32, in_chans=5)
    norm = manifest_normalization(read_manifest(shards))
    folder = work / "random_c5"
    save_model_folder(model, folder, extra={"image_size": 32, "normalization": norm.record()}, force=True)
    return str(folder)


def marker_in_8_bits(cells: Path) -> int:
    """The largest marker-channel value of the 8-bit composites (green): 0 means the conversion erased it."""
    from PIL import Image

    return max(int(np.asarray(Image.open(p))[..., 1].max()) for p in (cells / "rgb").rglob("*.png"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="microscopy_demo-"))
    cells, shards, runs = work / "cells", work / "shards", work / "runs"
    start = time.time()
    cli("make-demo", "microscopy", "--out", str(cells), "--per-class", str(args.per_class),
        "--test-per-class", str(args.test_per_class))
    names = "nuclei,cytoplasm,membrane,speckles,marker"
    for split in ("train", "test"):
        cli("shards", "--src", str(cells / split), "--out", str(shards / f"c5_{split}"), "--channels", "5",
            "--channel-names", names, "--shard-size", "100")
        cli("shards", "--src", str(cells / "rgb" / split), "--out", str(shards / f"rgb_{split}"), "--shard-size", "100")
    common = [f"train.output_dir={runs}", f"train.steps={args.steps}"]
    timings = {}
    for name, extra in (("c5", ["data.channels=5"]), ("rgb", ["data.channels=3"])):
        began = time.time()
        cli("pretrain", "-c", str(RECIPE), f"name={name}", f"data.train={shards / f'{name}_train'}", *common, *extra)
        timings[name] = round(time.time() - began, 1)
    rows = {
        "5-channel 16-bit, pretrained": knn(str(runs / "c5"), str(shards / "c5_train"), str(shards / "c5_test"),
                                            work, "c5"),
        "5-channel 16-bit, random init": knn(random_folder(work, str(shards / "c5_train")), str(shards / "c5_train"),
                                             str(shards / "c5_test"), work, "random"),
        "8-bit RGB composite, pretrained": knn(str(runs / "rgb"), str(shards / "rgb_train"), str(shards / "rgb_test"),
                                               work, "rgb"),
    }
    result = {
        "command": "python benchmarks/microscopy_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "data": {"classes": 3, "train": 3 * args.per_class, "test": 3 * args.test_per_class, "image": "64 px",
                 "chance_top1": 1 / 3, "marker_max_in_8_bits": marker_in_8_bits(cells)},
        "recipe": "recipes/microscopy_demo.yaml", "steps": args.steps, "pretrain_seconds": timings,
        "knn_top1": {name: row["top1"] for name, row in rows.items()},
        "pixel_knn_top1": {"5-channel 16-bit, normalised per channel": pixel_knn(str(shards / "c5_train"),
                                                                                  str(shards / "c5_test"), True),
                           "8-bit RGB composite": pixel_knn(str(shards / "rgb_train"), str(shards / "rgb_test"),
                                                            False)},
        "seconds": round(time.time() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
