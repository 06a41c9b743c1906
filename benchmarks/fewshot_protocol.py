"""The quickstart's k-shot columns under both few-shot protocols, side by side on the same backbones and features:
``heldout`` (shots drawn from the 259 training images, every draw scored on the same 111 test images; the
quickstart until 2026-12-03) and ``rest`` (shots drawn from all 370 images, each draw scored on every image it
did not draw; the quickstart since). Writes ``benchmarks/results/fewshot_protocol.json``.

    python benchmarks/fewshot_protocol.py runs/qs/a/quickstart runs/qs/b/quickstart ...   # + random init

For each backbone and protocol: the mean ± std over draws of the 1/5-shot linear probe and the gap to random init
(the quickstart's issue-13 target asks for a gap larger than the std). The random-init row is always added.
What to look for: how much the gap moves between checkpoints of the same recipe a few steps apart under each
protocol; a protocol whose gap moves by as much as the gap itself cannot show whether pretraining paid off.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ssl_hybrid.config import REPO_ROOT, load_config
from ssl_hybrid.eval.features import features_for_spec
from ssl_hybrid.eval.fewshot import fewshot_evaluate
from ssl_hybrid.machine import machine_info
from ssl_hybrid.quickstart import QUICKSTART_RECIPE, SHOTS, split_corpus

PROTOCOL_SEEDS = {"heldout": 5, "rest": 10}


def evaluate(spec: str, train_set, test_set, image_size: int, shots, seeds: dict[str, int]) -> dict:
    meta, (train, test) = features_for_spec(spec, [train_set, test_set], image_size, 128, 0, None)
    rows = {}
    for protocol, n in seeds.items():
        result = fewshot_evaluate(*train, *test, shots=shots, seeds=n, methods=("linear",), protocol=protocol,
                                  num_classes=len(train_set.classes))
        rows[protocol] = {f"{r['shots']}shot": {"mean": r["mean"], "std": r["std"], "n_test": r["n_test"],
                                                "seeds": n} for r in result["results"]}
    return {"spec": spec, "step": (meta.get("pretraining") or {}).get("step"), "protocols": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="quickstart run directories (pretrained backbones)")
    parser.add_argument("--heldout-seeds", type=int, default=PROTOCOL_SEEDS["heldout"])
    parser.add_argument("--rest-seeds", type=int, default=PROTOCOL_SEEDS["rest"])
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "fewshot_protocol.json"))
    args = parser.parse_args(argv)
    config = load_config(QUICKSTART_RECIPE)
    with tempfile.TemporaryDirectory() as tmp:  # the quickstart's split (same seed), not kept
        train_set, test_set = split_corpus(config.data.train, config.train.seed, Path(tmp))
    seeds = {"heldout": args.heldout_seeds, "rest": args.rest_seeds}
    size = config.data.image_size
    baseline = evaluate(f"random:{config.model.name}", train_set, test_set, size, SHOTS, seeds)
    backbones = [evaluate(run, train_set, test_set, size, SHOTS, seeds) for run in args.runs]
    for entry in backbones:
        for protocol, rows in entry["protocols"].items():
            for key, row in rows.items():
                base = baseline["protocols"][protocol][key]
                row["gap"] = row["mean"] - base["mean"]
    result = {
        "command": "python benchmarks/fewshot_protocol.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "setup": {"corpus": config.data.train, "model": config.model.name, "image_size": size, "shots": list(SHOTS),
                  "seeds": seeds, "probe": "linear (scikit-learn logistic regression, C chosen on held-out shots)"},
        "random_init": baseline,
        "pretrained": backbones,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for entry in [baseline, *backbones]:
        cells = [f"{p} 5-shot {100 * r['5shot']['mean']:.1f} ± {100 * r['5shot']['std']:.1f}"
                 + (f" (gap {100 * r['5shot']['gap']:+.1f})" if "gap" in r["5shot"] else "")
                 for p, r in entry["protocols"].items()]
        print(f"{entry['spec']}: " + "; ".join(cells))
    return result


if __name__ == "__main__":
    main()
