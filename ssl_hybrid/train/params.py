"""The start-up parameter summary of a pretraining model: what is trained, what is not, what is exported."""

from __future__ import annotations

import torch

# What each part of the pretraining model is, for the start-up parameter count.
PART_NAMES = {
    "backbone": "backbone",
    "mim": "MIM decoder",
    "dino": "DINO head",
    "simclr": "SimCLR head",
    "teacher": "EMA teacher",
}


def parameter_counts(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "frozen": n}} per top-level part (backbone, objective heads, teacher);
    a parameter shared by two parts counts once, in the first."""
    seen: set[int] = set()
    counts: dict[str, dict[str, int]] = {}
    for name, child in model.named_children():
        part = counts.setdefault(name, {"trainable": 0, "frozen": 0})
        for param in child.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                part["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def describe_parameters(model: torch.nn.Module) -> str:
    """'backbone 5.80M + MIM decoder 0.90M + DINO head 5.00M = 11.70M trained; not trained: DINO head 4096
    (frozen), EMA teacher 6.10M (an EMA copy of backbone + head); exported: the 5.80M backbone'."""
    counts = {name: c for name, c in parameter_counts(model).items() if c["trainable"] + c["frozen"]}
    trained = [(name, c["trainable"]) for name, c in counts.items() if c["trainable"]]
    text = " + ".join(f"{PART_NAMES.get(n, n)} {_count(v)}" for n, v in trained)
    text += f" = {_count(sum(v for _, v in trained))} trained"
    frozen = [
        f"{PART_NAMES.get(n, n)} {_count(c['frozen'])} "
        + ("(an EMA copy of backbone + head)" if n == "teacher" else "(frozen)")
        for n, c in counts.items()
        if c["frozen"]
    ]
    if frozen:
        text += "; not trained: " + ", ".join(frozen)
    backbone = counts.get("backbone", {"trainable": 0, "frozen": 0})
    return text + f"; exported: the {_count(backbone['trainable'] + backbone['frozen'])} backbone"
