"""The declared search space over the hybrid backbone family and seeded sampling of candidates from it.

A :class:`SearchSpace` lists, per architecture dimension, the values a candidate may take: the conv stage
type (batch-normed ResNet basic blocks as in ``resvit_*``, or the ConvNeXt stages of ``hybrid_*``), conv
widths and depths per stage, transformer depth, embedding width, heads, attention mode, token-selection
keep rate. So the search spans the conv/transformer split, from conv-heavy ``resvit``-like designs to
transformer-heavy ``hybrid``-like ones. A :class:`Candidate` is one choice per dimension; its id is a hash
of those choices, so the same architecture has the same id in every run (the resume key). Each candidate is
built through the registered preset factory of its conv type at ``SearchSpace.size``
(``timm.create_model("resvit_tiny", **model_kwargs)``), so it is an ordinary model that the trainer and the
evaluators already know how to build. A named preset can also join a search as a reference point
(:func:`preset_candidate`): built exactly as registered, measured and scored like every candidate.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
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


# Conv stage type (the constructor's ``conv_stages``) -> the preset family whose factories build it (their
# defaults fill what the space does not set: the ResNet stem, the ConvNeXt kernel).
CONV_TYPES = {"resnet": "resvit", "convnext": "hybrid"}
# Conv stage counts the constructor builds: stages at strides 4/8 (then a patch embedding to stride 16) or
# 4/8/16 (the transformer takes the stride-16 map).
STAGE_COUNTS = (2, 3)

# Dimension name -> the constructor argument it sets (conv_type also picks the preset family). One table, so
# a renamed constructor argument is a one-line change here, not a hunt through the search code.
MODEL_KWARG = {
    "conv_widths": "conv_dims",
    "conv_depths": "conv_depths",
    "conv_type": "conv_stages",
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

    # Preset size whose factory builds each candidate (``<family>_<size>``; its defaults fill what the space
    # does not set, e.g. the ConvNeXt kernel size).
    preset_size: str = "tiny"
    # Conv stage type: resnet (batch-normed basic blocks, the resvit_* presets) | convnext (the hybrid_* presets).
    conv_type: list = field(default_factory=lambda: ["resnet", "convnext"])
    # Channels per conv stage, 2 stages (strides 4/8, then a patch embedding) or 3 (strides 4/8/16); widths
    # and depths of different lengths are not sampled together. A resnet stem gets the first width.
    conv_widths: list = field(default_factory=lambda: [[32, 64, 128], [64, 128, 256], [32, 64], [64, 128]])
    # Blocks per conv stage (same length rule); the few-label regime leans on conv features.
    conv_depths: list = field(default_factory=lambda: [[1, 1, 1], [2, 2, 2], [1, 1], [2, 2]])
    # Conv stage counts each conv type may take (2: strides 4/8, then a patch embedding; 3: strides 4/8/16).
    # [3] and [2] keep the presets' layouts (resvit_*: ResNet stages to stride 16, hybrid_*: ConvNeXt to 8).
    resnet_stages: list = field(default_factory=lambda: list(STAGE_COUNTS))
    convnext_stages: list = field(default_factory=lambda: list(STAGE_COUNTS))
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
        unknown = [t for t in self.conv_type if t not in CONV_TYPES]
        if unknown:
            raise SearchSpaceError(
                f"search space: conv_type {', '.join(map(str, unknown))} unknown; choose from {', '.join(CONV_TYPES)}"
            )
        for conv_type in CONV_TYPES:
            counts = self.allowed_stages(conv_type)
            if not counts or not set(counts) <= set(STAGE_COUNTS):
                raise SearchSpaceError(
                    f"search space: {conv_type}_stages = {list(counts)}: choose among "
                    f"{', '.join(map(str, STAGE_COUNTS))} conv stages"
                )
        for conv_type in self.conv_type:
            stages = self.allowed_stages(conv_type)
            if not any(len(w) in stages for w in self.conv_widths) or not any(
                len(d) in stages for d in self.conv_depths
            ):
                raise SearchSpaceError(
                    f"search space: conv_type {conv_type} needs conv_widths and conv_depths of "
                    f"{' or '.join(map(str, stages))} stages"
                    f"(one value per stage); none listed"
                )

    def factory(self, conv_type: str) -> str:
        return f"{CONV_TYPES[conv_type]}_{self.preset_size}"

    def allowed_stages(self, conv_type: str) -> tuple[int, ...]:
        return tuple(getattr(self, f"{conv_type}_stages"))


@dataclass(frozen=True)
class Candidate:
    """One architecture: a choice per dimension of the space, plus the factory it is built with."""

    base: str
    choices: tuple  # ((dimension, value), ...) in MODEL_KWARG order; values JSON-like (lists become tuples)

    @property
    def preset(self) -> bool:
        """A registered preset built as is (a reference point of the search), not a point of the space."""
        return not self.choices

    @property
    def id(self) -> str:
        return "c" + hashlib.sha1(self.key().encode()).hexdigest()[:8]

    def key(self) -> str:
        return json.dumps({"base": self.base, **self.as_dict()}, sort_keys=True)

    def as_dict(self) -> dict[str, Any]:
        return {name: _listify(value) for name, value in self.choices}

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.base, **kwargs)``.

        Arguments the base's constructor lacks are left out; :func:`invalid_reason` has already refused a
        candidate that sets one to anything but its off value, so leaving them out changes nothing.
        """
        accepted = constructor_args(self.base)
        kwargs = {MODEL_KWARG[name]: value for name, value in self.as_dict().items() if MODEL_KWARG[name]}
        if kwargs.get("attn_mode") != "window":
            kwargs.pop("window_size", None)  # only window attention reads it
        if self.as_dict().get("conv_type") == "resnet" and "stem_dim" in accepted:
            kwargs["stem_dim"] = kwargs["conv_dims"][0]  # ResNet's stem is as wide as its first stage
        return {name: value for name, value in kwargs.items() if name in accepted}

    def label(self) -> str:
        """Short human-readable description for tables and plots."""
        if self.preset:
            return f"preset {self.base}"
        c = self.as_dict()
        conv = "/".join(f"{w}x{d}" for w, d in zip(c["conv_widths"], c["conv_depths"]))
        keep = f" keep{c['token_keep_rate']:g}" if c["token_keep_rate"] < 1 else ""
        attn = f"window{c['window_size']}" if c["attn_mode"] == "window" else c["attn_mode"]
        return f"{c['conv_type']} {conv}, vit {c['embed_dim']}x{c['depth']} h{c['num_heads']} {attn}{keep}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "base": self.base, "choices": self.as_dict()}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Candidate:
        if not payload["choices"]:
            return preset_candidate(payload["base"])
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


def preset_candidate(name: str) -> Candidate:
    """A registered preset (e.g. ``resvit_tiny``) as a reference point: built as registered, no choices."""
    constructor_args(name)  # an unknown name fails here, before anything is measured
    return Candidate(name, ())


@functools.cache
def constructor_args(factory: str) -> frozenset[str]:
    """Argument names the model class behind a registered factory accepts."""
    import ssl_hybrid.models  # noqa: F401  (registers the presets with timm)
    from ssl_hybrid.models.hybrid import HybridViT
    from ssl_hybrid.models.resvit import ResViT

    classes = {"hybrid": HybridViT, "resvit": ResViT}
    cls = classes.get(factory.split("_")[0])
    if cls is None:
        raise SearchSpaceError(f"search: {factory!r} is not a preset of the hybrid family ({', '.join(classes)}_*)")
    return frozenset(inspect.signature(cls).parameters)


# Arguments a conv type's constructor must accept before the space may set them to anything but "off".
_OFF_VALUES = {"attn_mode": "global", "token_keep_rate": 1.0}


def invalid_reason(choices: dict[str, Any], size: str = "tiny", stages: tuple[int, ...] = STAGE_COUNTS) -> str | None:
    """Why a combination cannot be built (None when it can)."""
    if choices["embed_dim"] % choices["num_heads"]:
        return f"embed_dim {choices['embed_dim']} not divisible by num_heads {choices['num_heads']}"
    if len(choices["conv_widths"]) != len(choices["conv_depths"]):
        return "conv_widths and conv_depths name a different number of stages"
    family = CONV_TYPES[choices["conv_type"]]
    if len(choices["conv_widths"]) not in stages:
        allowed = " or ".join(map(str, stages))
        return f"conv_type {choices['conv_type']} takes {allowed} conv stages here, got {len(choices['conv_widths'])}"
    accepted = constructor_args(f"{family}_{size}")
    for name, off in _OFF_VALUES.items():
        if choices[name] != off and name not in accepted:
            return f"conv_type {choices['conv_type']} ({family}_*) does not support {name}={choices[name]}"
    if choices["token_keep_rate"] < 1.0 and choices["depth"] < 2:
        # EViT places selection after the first block; with one block it would be a duplicate of keep 1.0
        return "token selection needs at least 2 transformer blocks"
    return _model_refusal(choices)


def _model_refusal(choices: dict[str, Any]) -> str | None:
    """The constructor's own one-line refusal of these options (its rules, in one place), None if it builds."""
    from ssl_hybrid.errors import UserError
    from ssl_hybrid.models.hybrid import check_options

    try:  # the image size is the search's (SearchConfig.check), any multiple of 16 stands in for it here
        check_options(
            (224, 224),
            choices["conv_type"],
            choices["conv_widths"],
            choices["conv_depths"],
            choices["attn_mode"],
            choices["window_size"],
            1,
            choices["depth"],
        )
    except (UserError, ValueError) as err:
        return str(err)
    return None


def sample_candidates(space: SearchSpace, count: int, seed: int) -> list[Candidate]:
    """``count`` distinct valid candidates, the same list for the same (space, count, seed).

    Candidates take the conv types in turn; every other dimension is drawn independently, and invalid or
    repeated draws are dropped (and counted). Raises when the space holds fewer than ``count`` valid candidates.
    """
    space.check()
    rng = random.Random(seed)
    dims = space.dimensions()
    seen: dict[str, Candidate] = {}
    refused: dict[str, int] = {}
    attempts, pending = 0, None
    max_attempts = 200 * count + 1000
    while len(seen) < count and attempts < max_attempts:
        attempts += 1
        # Conv types in turn, then the rest drawn until valid: each conv type gets an equal share of the
        # candidates even where one of them admits fewer combinations (the split is what the search is for).
        conv_type = pending or dims["conv_type"][len(seen) % len(dims["conv_type"])]
        choices = {name: rng.choice(values) for name, values in dims.items()}
        choices["conv_type"] = conv_type
        if choices["attn_mode"] != "window":
            choices["window_size"] = dims["window_size"][0]  # unused without windows: one canonical value, no twins
        reason = invalid_reason(choices, space.preset_size, space.allowed_stages(conv_type))
        if reason:
            refused[reason] = refused.get(reason, 0) + 1
            pending = conv_type
            continue
        pending = None
        candidate = make_candidate(space.factory(choices["conv_type"]), choices)
        seen.setdefault(candidate.id, candidate)
    if len(seen) < count:
        reasons = "; ".join(sorted(refused, key=lambda reason: refused[reason], reverse=True)[:3]) or "none"
        raise SearchSpaceError(
            f"search space: found only {len(seen)} distinct valid candidates of the "
            f"{count} asked for (space size {space.size()}; most frequent refusals: {reasons}); "
            "widen the space or sample fewer"
        )
    return list(seen.values())


def build_candidate(candidate: Candidate, image_size: int, **extra: Any):
    """The candidate as a model of its preset family (random init, no classifier: ``num_classes=0``)."""
    import timm

    import ssl_hybrid.models  # noqa: F401  (registers the presets with timm)

    kwargs = dict(candidate.model_kwargs(), pretrained=False, num_classes=0, img_size=image_size, **extra)
    return timm.create_model(candidate.base, **kwargs)
