"""The GPU check's markdown: one overview row per section (status, wall time, the headline numbers or the
error), then a table per section. Written from partial results too: a missing number shows as "–"."""

from __future__ import annotations

from typing import Any, Callable

DASH = "–"


def num(value: Any, digits: int = 1, suffix: str = "") -> str:
    return DASH if value is None else f"{value:.{digits}f}{suffix}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


# ---------------------------------------------------------------------------------------- per section

def throughput(out: dict) -> tuple[str, list[str]]:
    rows = out.get("rows", [])
    headline = ", ".join(f"{r['model']} {r['img_per_s']:.0f} img/s (util {r['utilization']:.2f})" for r in rows)
    peak = rows[0]["gemm_peak_gflop_per_s"] / 1e3 if rows else None
    body = table(["model", "params (M)", "img/s", "train GFLOPs/img", "achieved TFLOP/s", "GEMM peak TFLOP/s",
                  "utilization"],
                 [[r["model"], r["params_m"], num(r["img_per_s"]), num(r["train_gflops_per_img"], 2),
                   f"{r['achieved_gflop_per_s'] / 1e3:.3g}", f"{r['gemm_peak_gflop_per_s'] / 1e3:.3g}",
                   num(r["utilization"], 3)] for r in rows])
    return headline + (f"; GEMM {peak:.3g} TFLOP/s" if peak else ""), body


def masked(out: dict) -> tuple[str, list[str]]:
    runs = {name: r for name, r in out.items() if isinstance(r, dict) and "speedup" in r}
    headline = ", ".join(f"{name} {r['speedup']:.2f}x (FLOPs {r['flops_ratio']:.2f}x)" for name, r in runs.items())
    body = table(["model", "unmasked img/s", "masked img/s", "speedup", "FLOP ratio"],
                 [[name, num(r["img_per_s"]["unmasked"]), num(r["img_per_s"]["masked"]), num(r["speedup"], 2),
                   num(r["flops_ratio"], 2)] for name, r in runs.items()])
    return headline, body


def fp16_overflow(out: dict) -> tuple[str, list[str]]:
    scale = out.get("scale_at_injection") or [None, None]
    headline = (f"injected step {out.get('injected_step')}: "
                f"{'skipped by the scaler' if out.get('injected_step_skipped') else 'NOT skipped'} "
                f"(scale {num(scale[0], 0)} -> {num(scale[1], 0)}); scaler skips {out.get('scaler_skipped_steps')}; "
                f"{out.get('updated_after_injection', DASH)} updates after it; "
                f"recovered: {'yes' if out.get('recovered') else 'no'}; "
                f"loop non-finite skips {out.get('loop_nonfinite_total', DASH)}")
    body = table(["step", "loss", "scale before", "scale after", "scaler skipped", "weights changed"],
                 [[r["step"], DASH if r["loss"] is None else f"{r['loss']:.4g}", num(r["scale_before"], 0),
                   num(r["scale_after"], 0),
                   r["scaler_skipped"], r["params_changed"]] for r in out.get("records", [])])
    return headline, body + [f"{out[k]}\n" for k in ("scaler_note", "note") if out.get(k)]


def features(out: dict) -> tuple[str, list[str]]:
    runs = {name: r for name, r in out.items() if isinstance(r, dict) and "img_per_s" in r}
    headline = ", ".join(f"{name} {r['img_per_s']['autocast']:.0f} vs {r['img_per_s']['bare']:.0f} img/s "
                         f"({r['autocast_speedup']:.2f}x)" for name, r in runs.items())
    body = table(["model", "autocast dtype", "autocast img/s", "bare img/s", "speedup", "min cosine (autocast vs bare)"],
                 [[name, r["autocast_dtype"], num(r["img_per_s"]["autocast"]), num(r["img_per_s"]["bare"]),
                   num(r["autocast_speedup"], 2), num(r["min_cosine_autocast_vs_bare"], 4)] for name, r in runs.items()])
    return headline, body


def pretrain(out: dict) -> tuple[str, list[str]]:
    entries = out.get("entries", [])
    headline = (f"{out.get('data', DASH)}: {out.get('steps_done', DASH)}/{out.get('planned_steps', DASH)} steps in "
                f"{num(out.get('seconds'), 0)} s ({num(out.get('img_per_s'), 0)} img/s, {out.get('stopped', DASH)})")
    if len(entries) == 2:
        pre, rnd = entries
        headline += (f"; k-NN {pre['knn_top1']} vs {rnd['knn_top1']} random; "
                     f"5-shot {pre.get('5shot', DASH)} vs {rnd.get('5shot', DASH)}")
    shots = sorted({int(k[:-4]) for e in entries for k in e if k.endswith("shot")})
    body = table(["backbone", "k-NN top-1", "k-NN top-5"] + [f"linear {k}-shot" for k in shots],
                 [[e["name"], e["knn_top1"], e["knn_top5"]]
                  + [f"{e[f'{k}shot']} ± {e[f'{k}shot_std']}" if f"{k}shot" in e else DASH for k in shots]
                  for e in entries])
    return headline, body


def layout_compile(out: dict) -> tuple[str, list[str]]:
    layout, compiled = out.get("layout", {}), out.get("compile", {})
    headline = ""
    rows = []
    if layout:
        headline = f"channels_last {layout['channels_last_speedup']:.2f}x vs NCHW (faster: {layout['faster']})"
        rows += [[f"eager, {name}", num(v)] for name, v in layout["img_per_s"].items()]
    if compiled:
        headline += (f"; torch.compile ({compiled['backend']}) {compiled['compile_speedup']:.2f}x at "
                     f"{compiled['layout']}, first step {compiled['compile_s']:.0f} s")
        rows += [[f"compiled, {compiled['layout']}", num(compiled["img_per_s"]["compiled"])]]
    if "faster" in out:
        headline += f"; default to: channels_last={out['faster']['channels_last']}, compile={out['faster']['compile']}"
    notes = [out["compile_note"], ""] if out.get("compile_note") else []
    return headline, table(["setting", "img/s"], rows) + notes


def augment(out: dict) -> tuple[str, list[str]]:
    recipes = out.get("recipes", {})
    headline = (f"{out.get('model', DASH)} bf16 step {num(out.get('step_img_per_s'))} img/s; augmentation "
                + ", ".join(f"{name} {num(r['img_per_s'])} img/s ({r['step_over_augment']:.2f}x the step)"
                            for name, r in recipes.items())
                + f"; goal (>= 1x): {'met' if out.get('goal_met') else 'missed'}")
    body = table(["recipe", "augmentation img/s", "step time / augmentation time"],
                 [[name, num(r["img_per_s"]), num(r["step_over_augment"], 2)] for name, r in recipes.items()])
    return headline, body


DETAILS: dict[str, Callable[[dict], tuple[str, list[str]]]] = {
    "throughput": throughput, "masked": masked, "fp16_overflow": fp16_overflow, "features": features,
    "pretrain": pretrain, "layout_compile": layout_compile, "augment": augment}


# ---------------------------------------------------------------------------------------- the page

def section_text(name: str, out: dict) -> tuple[str, list[str]]:
    """(headline, detail lines); an error or a skip reason leads the headline."""
    try:
        headline, body = DETAILS[name](out)
    except (KeyError, TypeError, IndexError, ValueError) as err:  # partial results: show what is there
        headline, body = "", [f"(details unavailable: {type(err).__name__} {err})", ""]
    lead = out.get("error") or out.get("reason")
    if lead:
        headline = f"**{lead}**" + (f" · {headline}" if headline else "")
    return headline.replace("|", "/") or DASH, body


def markdown(result: dict) -> str:
    machine = result.get("machine", {})
    device = machine.get("gpu") or f"CPU ({machine.get('cpu_count')} cores)"
    lines = [f"# GPU check{' (smoke run on the CPU)' if result.get('smoke') else ''}", "",
             f"`{result.get('command')}` · started {result.get('started')} · total {num(result.get('wall_s'), 0)} s",
             "", f"{device} · torch {machine.get('torch')} (CUDA {machine.get('cuda')}, cuDNN {machine.get('cudnn')}) · "
                 f"timm {machine.get('timm')} · accelerate {machine.get('accelerate')} · Python {machine.get('python')}"
                 f" · commit {machine.get('git_commit')}", ""]
    texts = {name: section_text(name, out) for name, out in result.get("sections", {}).items()}
    lines += table(["section", "status", "wall (s)", "cap (s)", "result"],
                   [[name, out.get("status"), num(out.get("wall_s")), num(out.get("cap_s"), 0), texts[name][0]]
                    for name, out in result.get("sections", {}).items()])
    for name, (_, body) in texts.items():
        lines += [f"## {name}", "", *body]
    return "\n".join(lines).rstrip() + "\n"
