"""Global RNG capture / restore: a weights_only round trip, the checkpoint format of before, preserved()."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ssl_hybrid import rng


def draws() -> tuple:
    # np.random.randn(1) leaves a cached gaussian behind: the state's has_gauss / cached_gaussian matter
    return random.random(), np.random.rand(), float(np.random.randn(1)[0]), torch.rand(1).item()


def test_a_capture_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn(1)  # now a gaussian is cached
    torch.save(rng.capture(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert draws() != expected
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_checkpoints_of_before_restore(tmp_path):
    """rank_<r>.pt files written before ssl_hybrid.rng existed: the same keys, spelled out here."""
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    old = {"python": random.getstate(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
           "torch": torch.get_rng_state()}
    torch.save({"rng": old, "stream": {}}, tmp_path / "rank_0.pt")
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    rng.restore(torch.load(tmp_path / "rank_0.pt", weights_only=True)["rng"])
    assert draws() == expected
    assert set(rng.capture(cuda=False)) == set(old)


@pytest.mark.parametrize("cuda", [True, False])
def test_preserved_undoes_draws_and_seeds_inside(cuda):
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    with rng.preserved(cuda=cuda):
        draws()
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        draws()
    assert draws() == expected


def test_preserved_restores_after_an_error():
    torch.manual_seed(8)
    expected = torch.rand(1).item()
    torch.manual_seed(8)
    with pytest.raises(RuntimeError), rng.preserved():
        torch.rand(5)
        raise RuntimeError("boom")
    assert torch.rand(1).item() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_generators_are_captured_unless_asked_not_to():
    torch.cuda.manual_seed_all(3)
    expected = torch.rand(1, device="cuda").item()
    torch.cuda.manual_seed_all(3)
    with rng.preserved():
        torch.cuda.manual_seed_all(0)
        torch.rand(4, device="cuda")
    assert torch.rand(1, device="cuda").item() == expected
    assert "cuda" in rng.capture() and "cuda" not in rng.capture(cuda=False)
