"""Re-check the search's confirmation with an idle-machine step calibration.

The search measured CPU seconds per step once, under load; on an idle machine resvit_tiny's step costs 1.90x the
chosen design's instead of 2.13x, so at equal CPU time resvit_tiny gets 77 steps, not 69. This retrains it with 77
steps for seeds 1001-1006 (and the chosen design with its 147 steps for 1004-1006; 1001-1003 are the search's own
confirmation runs), then prints the paired difference. Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/results/search_split_flowers12/fairness_check.py run cd6a1baf1 1001 77
    OMP_NUM_THREADS=1 python benchmarks/results/search_split_flowers12/fairness_check.py run c740595e1 1004 147
    python benchmarks/results/search_split_flowers12/fairness_check.py summary      # -> fairness_check.json
"""

import json
import statistics
import sys
from pathlib import Path

from ssl_hybrid.search.confirm import paired_difference
from ssl_hybrid.search.proxy import PretrainKnnProxy
from ssl_hybrid.search.run import load_search_config
from ssl_hybrid.search.space import Candidate

HERE = Path(__file__).parent
WORK = Path("/tmp/fairness_check")
STATE = json.loads((HERE / "state.json").read_text())


def run(cid: str, seed: int, steps: int) -> None:
    config = load_search_config("recipes/search_split_flowers12.yaml")
    proxy = PretrainKnnProxy(config.proxy, WORK / f"{cid}_{seed}")
    result = proxy(Candidate.from_json(STATE["candidates"][cid]), steps, 1, seed=seed)
    keep = {k: result[k] for k in ("score", "train_cpu_seconds")}
    (WORK / f"{cid}_{seed}.json").write_text(json.dumps(dict(keep, cid=cid, seed=seed, steps=steps)))


def summary() -> None:
    confirmed = STATE["confirm"]["scores"]["c740595e1"]
    seeds = range(1001, 1007)

    def score(cid: str, seed: int) -> float:
        if cid == "c740595e1" and str(seed) in confirmed:
            return confirmed[str(seed)]["score"]
        return json.loads((WORK / f"{cid}_{seed}.json").read_text())["score"]

    chosen = [score("c740595e1", s) for s in seeds]
    preset = [score("cd6a1baf1", s) for s in seeds]
    result = {
        "seeds": list(seeds),
        "chosen_c740595e1_147_steps": chosen,
        "resvit_tiny_77_steps": preset,
        "means": [statistics.fmean(chosen), statistics.fmean(preset)],
        "paired_difference": paired_difference([a - b for a, b in zip(chosen, preset)]),
        "runs": [json.loads(p.read_text()) for p in sorted(WORK.glob("c*_*.json"))],
        "step_cpu_seconds": {
            "search (under load)": {cid: STATE["step_seconds"][cid] for cid in ("c740595e1", "cd6a1baf1")},
            "idle, 2 repeats": {"c740595e1": [0.678, 0.754], "cd6a1baf1": [1.346, 1.371]},
        },
    }
    (HERE / "fairness_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["paired_difference"]))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        WORK.mkdir(parents=True, exist_ok=True)
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        summary()
