"""A candidate as a pretraining recipe: the base recipe with the candidate's ``model`` section.

The recipe written for the chosen candidate is what ``ssl-hybrid pretrain -c`` takes directly; the
proxy runs use the same function (plus their short step budget), so what was searched is what is trained.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ssl_hybrid.config import Config, load_config
from ssl_hybrid.search.space import Candidate

# Constructor arguments that already have their own ModelConfig field; every other one goes to model.arch.
_OWN_FIELDS = ("attn_mode", "token_keep_rate")


def model_section(candidate: Candidate) -> dict[str, Any]:
    """The ``model:`` group of a recipe that builds ``candidate``."""
    kwargs = candidate.model_kwargs()
    section: dict[str, Any] = {"name": candidate.base}
    for name in _OWN_FIELDS:
        if name in kwargs:
            section[name] = kwargs.pop(name)
    section["arch"] = kwargs
    return section


def read_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The base recipe (+ ``key=value`` overrides) as a plain dict, validated through load_config first so
    errors name the file or the override."""
    from omegaconf import OmegaConf

    load_config(path or None, list(overrides))
    recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {} if path else {}
    if overrides:
        merged = OmegaConf.merge(OmegaConf.create(recipe), OmegaConf.from_dotlist(list(overrides)))
        recipe = OmegaConf.to_container(merged)
    return recipe


def candidate_recipe(base: dict[str, Any], candidate: Candidate, name: str | None = None) -> dict[str, Any]:
    """``base`` with the candidate's model group (other model keys of the base, e.g. drop_path_rate, kept)."""
    recipe = copy.deepcopy(base)
    model = dict(recipe.get("model") or {})
    model.pop("arch", None)  # the base's own architecture overrides would mix with the candidate's
    model.update(model_section(candidate))
    recipe["model"] = model
    if name:
        recipe["name"] = name
    return recipe


def write_recipe(path: str | Path, recipe: dict[str, Any], header: str = "") -> Path:
    from ssl_hybrid.runs import write_text_atomic

    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(recipe, sort_keys=False)
    return write_text_atomic(path, lambda handle: handle.write(text))


def candidate_config(
    base: dict[str, Any], candidate: Candidate, overrides: list[str], tmp_dir: Path, name: str
) -> Config:
    """The validated Config a proxy run trains: base recipe + candidate + ``key=value`` overrides."""
    recipe_path = write_recipe(Path(tmp_dir) / f"{name}.yaml", candidate_recipe(base, candidate, name))
    return load_config(recipe_path, overrides)
