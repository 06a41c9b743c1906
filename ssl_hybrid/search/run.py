"""``ssl-hybrid search``: sample -> measure and reject over budget -> zero-cost prune -> successive
halving with the trained proxy -> Pareto table, plot and the chosen candidate's recipe.

Everything lands in ``<output_dir>/<name>/``: ``state.json`` (resumable state), ``pareto.md``,
``pareto.json``, ``pareto.png``, ``chosen.yaml`` (a recipe ``ssl-hybrid pretrain -c`` accepts) and
``runs/`` (one pretraining run per candidate and rung).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssl_hybrid.config import TrainConfig
from ssl_hybrid.errors import ConfigError, UserError
from ssl_hybrid.machine import machine_info
from ssl_hybrid.runs import write_json_atomic
from ssl_hybrid.search import report
from ssl_hybrid.search.budget import Budget, measure_and_check
from ssl_hybrid.search.confirm import ConfirmConfig, confirm_seeds, markdown_section, run_confirmation
from ssl_hybrid.search.halving import (
    HalvingSchedule,
    Scorer,
    SearchState,
    SearchStateError,
    rung_plan,
    successive_halving,
)
from ssl_hybrid.search.proxy import ProxyConfig
from ssl_hybrid.search.recipe import candidate_recipe, read_recipe, write_recipe
from ssl_hybrid.search.space import Candidate, SearchSpace, build_candidate, preset_candidate, sample_candidates

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class ZeroCostConfig:
    # Compute the NASWOT score of every accepted candidate (one forward pass each; recorded and correlated).
    enabled: bool = True
    # Share of accepted candidates (best NASWOT first) that go on to training; 1.0 = prune nothing.
    keep_fraction: float = 1.0
    # Images in the NASWOT batch (the kernel is batch x batch).
    batch_size: int = 32


@dataclass
class SearchConfig:
    # The search directory is <output_dir>/<name>.
    name: str = "search"
    output_dir: str = TrainConfig.output_dir
    # One seed for candidate sampling, the zero-cost batch and the proxy's k-NN split.
    seed: int = 0
    # Candidates drawn from the space before budget rejection.
    num_candidates: int = 12
    # Named presets (e.g. resvit_tiny, hybrid_tiny) measured and scored in every rung with the same budget as
    # the candidates, as reference points: never rejected, pruned, promoted in a candidate's place or chosen.
    references: list = field(default_factory=list)
    # Image size the constraints are measured at (use your deployment size).
    image_size: int = 224
    space: SearchSpace = field(default_factory=SearchSpace)
    budget: Budget = field(default_factory=Budget)
    zero_cost: ZeroCostConfig = field(default_factory=ZeroCostConfig)
    schedule: HalvingSchedule = field(default_factory=HalvingSchedule)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    # After the last rung: the winner and the references retrained with fresh seeds, compared seed by seed.
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)

    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def check(self) -> None:
        if self.num_candidates < 1:
            raise ConfigError(f"search: num_candidates = {self.num_candidates}: must be >= 1")
        if self.image_size <= 0 or self.image_size % 16:
            raise ConfigError(f"search: image_size = {self.image_size}: must be a positive multiple of 16")
        if not 0.0 < self.zero_cost.keep_fraction <= 1.0:
            raise ConfigError(f"search: zero_cost.keep_fraction = {self.zero_cost.keep_fraction}: must be in (0, 1]")
        if self.zero_cost.batch_size < 2:
            raise ConfigError("search: zero_cost.batch_size must be >= 2 (the kernel compares images)")
        self.space.check()
        self.schedule.check()
        self.confirm.check()

    def fingerprint(self) -> str:
        """What decides the search's results; name/output_dir do not (a moved directory still resumes), nor
        does the confirmation (a finished search can be confirmed, or confirmed with more seeds, later)."""
        values = dataclasses.asdict(self)
        values.pop("name"), values.pop("output_dir"), values.pop("confirm")
        # Proxy options added after the first searches, left out at the values that score as those did
        # (held-out queries, the model's own pooling), so a search started before them keeps its fingerprint.
        for key, old_behaviour in (("knn_protocol", "heldout"), ("pooling", "default")):
            if values["proxy"][key] == old_behaviour:
                values["proxy"].pop(key)
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_search_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SearchConfig:
    """Defaults <- YAML <- key=value, strictly typed like the pretraining config (unknown keys raise)."""
    from ssl_hybrid.config import load_layered

    config = load_layered(SearchConfig, path, overrides)
    config.check()
    return config


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def measure_candidates(state: SearchState, config: SearchConfig, device: torch.device) -> None:
    """Measure every candidate not measured yet; over-budget ones are marked rejected (never trained).
    References are measured against no limit: they are scored whatever they cost."""
    for candidate in state.candidates():
        if state.measurement(candidate.id) is not None:
            continue
        torch.manual_seed(config.seed)
        model = build_candidate(candidate, config.image_size)
        unlimited = dataclasses.replace(
            config.budget, max_params_m=0, max_gflops=0, max_latency_ms=0, min_train_images_per_s=0
        )
        limits = unlimited if candidate.id in state.references() else config.budget
        result = measure_and_check(model, config.image_size, limits, device)
        log.info(
            "%s %s: %.2f M params, %s GFLOPs, %s ms%s",
            candidate.id,
            candidate.label(),
            result["params_m"],
            _short(result.get("gflops")),
            _short(result.get("latency_ms")),
            f" -> rejected ({result['rejected']})" if result["rejected"] else "",
        )
        state.record_measurement(candidate.id, result)
        del model


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def zero_cost_prune(state: SearchState, config: SearchConfig, images: Callable[[], torch.Tensor]) -> list[str]:
    """NASWOT score for each accepted candidate, then keep the best ``keep_fraction``; returns the survivors."""
    from ssl_hybrid.search.zero_cost import naswot_score

    references = state.references()
    accepted = [cid for cid in state.accepted() if cid not in references]
    if not config.zero_cost.enabled:
        return accepted
    if state.data.get("zero_cost_done"):
        return [cid for cid in accepted if cid not in state.data["pruned"]]
    batch = None
    for cid in [*accepted, *references]:  # references get a score too (shown, never pruned)
        if cid in state.data["zero_cost"]:
            continue
        batch = images() if batch is None else batch
        torch.manual_seed(config.seed)
        state.data["zero_cost"][cid] = naswot_score(build_candidate(state.candidate(cid), batch.shape[-1]), batch)
        state.save()
    keep = max(1, math.ceil(config.zero_cost.keep_fraction * len(accepted)))
    ranked = sorted(accepted, key=lambda cid: (-state.data["zero_cost"][cid], cid))
    state.data["pruned"] = ranked[keep:]
    state.data["zero_cost_done"] = True
    state.save()
    if ranked[keep:]:
        log.info(
            "zero-cost proxy pruned %d of %d candidates: %s", len(ranked) - keep, len(ranked), ", ".join(ranked[keep:])
        )
    return [cid for cid in accepted if cid not in state.data["pruned"]]


def write_outputs(
    state: SearchState, config: SearchConfig, winner: str | None, seconds: float, device: torch.device
) -> dict[str, Any]:
    """pareto.md / pareto.json / pareto.png / chosen.yaml in the search directory; returns the JSON summary."""
    out = config.out_dir()
    rows = report.build_rows(state.data, winner)
    summary = {
        "name": config.name,
        "command": " ".join(["ssl-hybrid", *sys.argv[1:]]) if _from_cli() else None,
        "chosen": winner,
        "seconds": seconds,
        "machine": machine_info(str(device)),
        "plan": rung_plan(len(state.data["rungs"][0]["members"]) if state.data["rungs"] else 0, config.schedule),
        "zero_cost_spearman_vs_rung0": _rank_correlation(rows, "zero_cost"),
        # How much of the rung-0 ranking the architecture's random-init features already give.
        "init_spearman_vs_rung0": _rank_correlation(rows, "init_score"),
        "config": dataclasses.asdict(config),
        "rows": rows,
    }
    write_json_atomic(out / "pareto.json", summary)
    table = report.markdown_table(rows)
    confirmation = state.data.get("confirm", {}).get("summary")
    if confirmation and confirmation.get("winner") == winner:
        summary["confirm"] = confirmation
        table += markdown_section(confirmation)
    (out / "pareto.md").write_text(f"# Search `{config.name}`\n\n{table}", encoding="utf-8")
    report.scatter_plot(
        rows,
        out / "pareto.png",
        f"search '{config.name}': {sum(not r['reference'] for r in rows)} candidates"
        + (f" + {sum(r['reference'] for r in rows)} presets" if any(r["reference"] for r in rows) else "")
        + ", k-NN top-1 after "
        + (
            f"{config.schedule.min_seconds:g} CPU-s of pretraining each"
            if config.schedule.min_seconds
            else f"{config.schedule.min_steps} steps"
        ),
    )
    if winner is not None:
        base = chosen_base_recipe(config)
        chosen = state.candidate(winner)
        header = (
            f"Chosen by `ssl-hybrid search` ({config.name}): {winner} = {chosen.label()}\n"
            f"Base recipe: {config.proxy.recipe or '(defaults)'}; train with: ssl-hybrid pretrain -c <this file>"
        )
        summary["recipe"] = str(
            write_recipe(out / "chosen.yaml", candidate_recipe(base, chosen, f"{config.name}-chosen"), header)
        )
    return summary


def _rank_correlation(rows: list[dict[str, Any]], key: str) -> float:
    """Spearman correlation of ``row[key]`` with the rung-0 score over rows that have both (nan if < 3)."""
    from ssl_hybrid.search.zero_cost import spearman

    pairs = [
        (r[key], r["score"])
        for r in rows
        if r.get(key) is not None and r["score"] is not None and math.isfinite(r[key])
    ]
    return spearman([p[0] for p in pairs], [p[1] for p in pairs])


def chosen_base_recipe(config: SearchConfig) -> dict[str, Any]:
    """The base recipe + recipe_overrides, pointed at the data the search used (its shards, its labeled set
    for the online k-NN monitor), so chosen.yaml trains on the user's data as searched."""
    from ssl_hybrid.search.proxy import prepare_train_data

    base = read_recipe(config.proxy.recipe, config.proxy.recipe_overrides)
    data = base.setdefault("data", {})
    train = prepare_train_data(config.proxy, config.out_dir())
    if train:
        data["train"] = str(Path(train).resolve())
    if config.proxy.knn_train:
        data["val"] = str(Path(config.proxy.knn_train).resolve())
    return base


def _from_cli() -> bool:
    return bool(sys.argv) and Path(sys.argv[0]).name in ("ssl-hybrid", "__main__.py") and "search" in sys.argv


def steps_for_seconds(
    state: SearchState, step_seconds: Callable[[Candidate], float]
) -> Callable[[Candidate, float], int]:
    """steps_for(candidate, seconds): ``seconds`` over the candidate's seconds per step, measured once per
    candidate (kept in the state, so every rung and a resumed search use the same calibration)."""

    def steps_for(candidate: Candidate, seconds: float) -> int:
        measured = state.data.setdefault("step_seconds", {})
        if candidate.id not in measured:
            measured[candidate.id] = float(step_seconds(candidate))
            log.info("%s: %.3f s per pretraining step on this machine", candidate.id, measured[candidate.id])
            state.save()
        return max(1, round(seconds / measured[candidate.id]))

    return steps_for


def open_state(config: SearchConfig) -> SearchState:
    """The search's state (new, or resumed when written under this configuration). A state from before
    proxy.pooling / proxy.knn_protocol existed is refused with how to resume it: it was scored differently."""
    path = config.out_dir() / STATE_FILE
    try:
        return SearchState.load_or_create(path, config.fingerprint())
    except SearchStateError:
        old_scoring = dataclasses.replace(
            config, proxy=dataclasses.replace(config.proxy, pooling="default", knn_protocol="heldout")
        )
        if json.loads(path.read_text(encoding="utf-8")).get("fingerprint") == old_scoring.fingerprint():
            raise SearchStateError(
                f"{path}: this search was scored with the model's own pooling on held-out queries (written before "
                "proxy.pooling and proxy.knn_protocol existed); resume it with proxy.pooling=default "
                "proxy.knn_protocol=heldout, or start a new search under another name"
            ) from None
        raise


def report_search(config: SearchConfig) -> dict[str, Any]:
    """Write the outputs from the state so far (a search still running, interrupted or done) without running
    anything; a rung in progress counts with the candidates it has scored. Returns the summary."""
    path = config.out_dir() / STATE_FILE
    if not path.exists():
        raise UserError(f"search: {path} does not exist; run the search first")
    written_under = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
    if written_under != config.fingerprint():  # reading mixes nothing, so report it, but say so
        log.warning("%s was written under another search configuration; reporting it with this one", path)
    state = SearchState.load_or_create(path, written_under)
    summary = write_outputs(state, config, state.best(), state.elapsed_seconds(), torch.device("cpu"))
    summary["status"] = state.data["status"]
    write_json_atomic(config.out_dir() / "pareto.json", summary)
    return summary


def run_search(
    config: SearchConfig,
    scorer: Scorer | None = None,
    device: torch.device | None = None,
    zero_cost_images: Callable[[], torch.Tensor] | None = None,
    step_seconds: Callable[[Candidate], float] | None = None,
) -> dict[str, Any]:
    """Run or resume the search in ``config.out_dir()``; returns the summary written to pareto.json.

    ``scorer`` defaults to the trained proxy (short pretraining + k-NN); tests inject cheap ones.
    ``zero_cost_images`` makes the NASWOT batch; by default images of the k-NN bank (or seeded noise
    when an injected scorer has no labeled set). ``step_seconds(candidate)`` calibrates time budgets
    (``schedule.min_seconds``); by default a short real pretraining run of the candidate.
    """
    config.check()
    start = time.perf_counter()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = config.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    state = open_state(config)
    references = [preset_candidate(name) for name in config.references]
    state.add_candidates(sample_candidates(config.space, config.num_candidates, config.seed))
    state.add_candidates(references)
    state.data["references"] = [c.id for c in references]
    state.save()
    measure_candidates(state, config, device)
    if not [cid for cid in state.accepted() if cid not in state.references()]:
        raise UserError(
            f"search: all {config.num_candidates} candidates are over budget "
            f"({json.dumps(dataclasses.asdict(config.budget))}); relax search.budget or the space"
        )
    if scorer is None:
        from ssl_hybrid.search.proxy import PretrainKnnProxy

        scorer = PretrainKnnProxy(config.proxy, out)
        step_seconds = step_seconds or scorer.step_seconds
        zero_cost_images = zero_cost_images or (
            lambda: scorer.sets.sample_images(config.zero_cost.batch_size, config.image_size, config.seed)
        )
    zero_cost_images = zero_cost_images or (
        lambda: torch.randn(
            config.zero_cost.batch_size,
            3,
            config.image_size,
            config.image_size,
            generator=torch.Generator().manual_seed(config.seed),
        )
    )
    members = zero_cost_prune(state, config, zero_cost_images)
    if config.schedule.min_seconds and step_seconds is None:
        raise UserError(
            "search.schedule.min_seconds needs a way to time a step: use the trained proxy (no injected scorer)"
        )
    steps_for = steps_for_seconds(state, step_seconds) if step_seconds else None
    if config.schedule.min_seconds and steps_for is not None:
        # Time every step back to back before any training: on a shared machine the load drifts, and
        # calibrations taken close together are the ones that compare.
        for cid in [*members, *state.references()]:
            steps_for(state.candidate(cid), config.schedule.min_seconds)
    winner = successive_halving(state, members, config.schedule, scorer, steps_for)
    if winner is not None and config.confirm.seeds:
        run_confirmation(state, winner, confirm_seeds(config.confirm, config.seed), scorer, steps_for)
    summary = write_outputs(state, config, winner, time.perf_counter() - start, device)
    summary["seconds_all_invocations"] = state.elapsed_seconds()
    write_json_atomic(out / "pareto.json", summary)
    return summary
