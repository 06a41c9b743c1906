"""The declared search space over the hybrid backbone and seeded sampling of candidates from it.

A :class:`SearchSpace` lists, per architecture dimension, the values a candidate may take (conv widths
and depths per stage, transformer depth, embedding width, heads, attention mode, token-selection keep
rate). A :class:`Candidate` is one choice per dimension; its id is a hash of those choices, so the same
architecture has the same id in every run (the resume key). Candidates are built through the hybrid
factory named by ``SearchSpace.base`` (``timm.create_model(base, **model_kwargs)``), so every candidate
is an ordinary ``hybrid`` model that the trainer and the evaluators already know how to build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)


class SearchSpaceError(UserError):
    """A search space that cannot produce the requested candidates."""


# Dimension name -> the hybrid constructor argument it sets. One table, so a renamed constructor
# argument is a one-line change here, not a hunt through the search code.
MODEL_KWARG = {
    "conv_widths": "conv_dims",
    "conv_depths": "conv_depths",
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "attn_mode": "attn_mode",
    "window_size": "window_size",
    "token_keep_rate": "token_keep_rate",
}


@dataclass
class SearchSpace:
    """Allowed values per dimension; a dimension with one value is fixed."""

    # The registered hybrid factory every candidate is built through (its defaults fill what we do not set).
    base: str = "hybrid_tiny"
    # Channels of the stride-4 and stride-8 conv stages: light stages keep the masked step cheap.
    conv_widths: list = field(default_factory=lambda: [[32, 64], [48, 96], [64, 128]])
    # Blocks per conv stage; the few-label regime leans on conv features, so depth here can matter.
    conv_depths: list = field(default_factory=lambda: [[1, 1], [1, 2], [2, 2]])
    # Transformer width at stride 16.
    embed_dim: list = field(default_factory=lambda: [128, 192, 256])
    # Transformer blocks.
    depth: list = field(default_factory=lambda: [2, 4, 6])
    # Attention heads (a candidate whose embed_dim is not divisible by its heads is skipped).
    num_heads: list = field(default_factory=lambda: [2, 4])
    # global | window | topk attention in the transformer blocks.
    attn_mode: list = field(default_factory=lambda: ["global", "window"])
    # Window side (in stride-16 tokens) for attn_mode=window; a window as large as the token grid is global
    # attention, so at small image sizes choose windows smaller than image_size / 16.
    window_size: list = field(default_factory=lambda: [7])
    # Token-selection keep rate (1.0 = off).
    token_keep_rate: list = field(default_factory=lambda: [1.0, 0.7])

    def dimensions(self) -> dict[str, list]:
        return {name: list(getattr(self, name)) for name in MODEL_KWARG}

    def size(self) -> int:
        """Number of combinations before the validity filter."""
        return math.prod(len(values) for values in self.dimensions().values())

    def check(self) -> None:
        for name, values in self.dimensions().items():
            if not values:
                raise SearchSpaceError(f"search space: dimension '{name}' has no values")


@dataclass(frozen=True)
class Candidate:
    """One architecture: a choice per dimension of the space, plus the factory it is built with."""

    base: str
    choices: tuple  # ((dimension, value), ...) in MODEL_KWARG order; values JSON-like (lists become tuples)

    @property
    def id(self) -> str:
        return "c" + hashlib.sha1(self.key().encode()).hexdigest()[:8]

    def key(self) -> str:
        return json.dumps({"base": self.base, **self.as_dict()}, sort_keys=True)

    def as_dict(self) -> dict[str, Any]:
        return {name: _listify(value) for name, value in self.choices}

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.base, **kwargs)``."""
        return {MODEL_KWARG[name]: value for name, value in self.as_dict().items()}

    def label(self) -> str:
        """Short human-readable description for tables and plots."""
        c = self.as_dict()
        conv = "/".join(f"{w}x{d}" for w, d in zip(c["conv_widths"], c["conv_depths"]))
        keep = f" keep{c['token_keep_rate']:g}" if c["token_keep_rate"] < 1 else ""
        attn = f"window{c['window_size']}" if c["attn_mode"] == "window" else c["attn_mode"]
        return f"conv {conv}, vit {c['embed_dim']}x{c['depth']} h{c['num_heads']} {attn}{keep}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "base": self.base, "choices": self.as_dict()}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Candidate:
        return make_candidate(payload["base"], payload["choices"])


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (list, tuple)) else value


def _tupleify(value: Any) -> Any:
    return tuple(_tupleify(v) for v in value) if isinstance(value, (list, tuple)) else value


def make_candidate(base: str, choices: dict[str, Any]) -> Candidate:
    missing = [name for name in MODEL_KWARG if name not in choices]
    if missing:
        raise SearchSpaceError(f"candidate is missing dimension(s) {', '.join(missing)}")
    return Candidate(base, tuple((name, _tupleify(choices[name])) for name in MODEL_KWARG))


def invalid_reason(choices: dict[str, Any]) -> str | None:
    """Why a combination cannot be built (None when it can)."""
    if choices["embed_dim"] % choices["num_heads"]:
        return f"embed_dim {choices['embed_dim']} not divisible by num_heads {choices['num_heads']}"
    if len(choices["conv_widths"]) != len(choices["conv_depths"]):
        return "conv_widths and conv_depths name a different number of stages"
    if choices["token_keep_rate"] < 1.0 and choices["depth"] < 2:
        # EViT places selection after the first block; with one block it would be a duplicate of keep 1.0
        return "token selection needs at least 2 transformer blocks"
    return None


def sample_candidates(space: SearchSpace, count: int, seed: int) -> list[Candidate]:
    """``count`` distinct valid candidates, the same list for the same (space, count, seed).

    Uniform over valid combinations: draw each dimension independently, drop invalid or repeated
    draws. Raises when the space holds fewer than ``count`` valid candidates.
    """
    space.check()
    rng = random.Random(seed)
    dims = space.dimensions()
    seen: dict[str, Candidate] = {}
    attempts = 0
    max_attempts = 200 * count + 1000
    while len(seen) < count and attempts < max_attempts:
        attempts += 1
        choices = {name: rng.choice(values) for name, values in dims.items()}
        if choices["attn_mode"] != "window":
            choices["window_size"] = dims["window_size"][0]  # unused without windows: one canonical value, no twins
        if invalid_reason(choices):
            continue
        candidate = make_candidate(space.base, choices)
        seen.setdefault(candidate.id, candidate)
    if len(seen) < count:
        raise SearchSpaceError(
            f"search space: found only {len(seen)} distinct valid candidates of the "
            f"{count} asked for (space size {space.size()}); widen the space or sample fewer"
        )
    return list(seen.values())


def build_candidate(candidate: Candidate, image_size: int, **extra: Any):
    """The candidate as a hybrid model (random init, no classifier: ``num_classes=0``)."""
    import timm

    import ssl_hybrid.models  # noqa: F401  (registers hybrid_* with timm)

    kwargs = dict(candidate.model_kwargs(), pretrained=False, num_classes=0, img_size=image_size, **extra)
    return timm.create_model(candidate.base, **kwargs)
