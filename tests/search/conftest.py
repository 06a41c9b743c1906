"""Tiny search spaces for fast tests: hybrid_nano-sized candidates at 32 px."""

from __future__ import annotations

import pytest

from ssl_hybrid.search.budget import Budget
from ssl_hybrid.search.halving import HalvingSchedule
from ssl_hybrid.search.run import SearchConfig, ZeroCostConfig
from ssl_hybrid.search.space import SearchSpace


def tiny_space() -> SearchSpace:
    return SearchSpace(preset_size="nano", conv_type=["convnext"], conv_widths=[[8, 16], [16, 32]], conv_depths=[[1, 1]],
                       embed_dim=[32, 64], depth=[1, 2], num_heads=[2], attn_mode=["global", "window"],
                       window_size=[1], token_keep_rate=[1.0, 0.7])


@pytest.fixture
def tiny_search(tmp_path) -> SearchConfig:
    return SearchConfig(name="tiny", output_dir=str(tmp_path / "searches"), seed=0, num_candidates=8,
                        image_size=32, space=tiny_space(), budget=Budget(repeats=2, warmup=1),
                        zero_cost=ZeroCostConfig(enabled=True, keep_fraction=1.0, batch_size=4),
                        schedule=HalvingSchedule(min_steps=5, eta=2, max_rungs=3))
