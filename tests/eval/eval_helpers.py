"""Data makers shared by the evaluation tests (imported by name: pytest's conftest is not importable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_hybrid.config import EvalConfig


def make_labeled_folder(root: Path, classes: int, per_class: int, seed: int, size: int = 40) -> Path:
    """Class-coloured noisy images (separable but not identical) in class sub-folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        base = np.array([(c * 80) % 256, (c * 140 + 40) % 256, (c * 200 + 90) % 256])
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 35, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return root



def clustered(n: int, classes: int, dim: int, seed: int, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((classes, dim))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + noise * rng.standard_normal((n, dim))).astype(np.float32), labels


def shared_dataset(name: str) -> Path:
    """tests/conftest.py's ``shared_dataset`` (skips when absent), loaded by path because every test
    folder's conftest module is called ``conftest`` and a plain import may find the wrong one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ssl_hybrid_root_conftest", Path(__file__).parent.parent / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shared_dataset(name)


def knn_reference_numpy(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    k: int,
    temperature: float = EvalConfig.knn_temperature,
    num_classes: int | None = None,
) -> np.ndarray:
    """Brute-force float64 numpy k-NN (the oracle the FAISS k-NN is checked against): full similarity matrix, full sort."""
    bank = np.asarray(bank, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    bank_labels = np.asarray(bank_labels)
    num_classes = num_classes or int(bank_labels.max()) + 1
    sims = queries @ bank.T  # [Q, N]
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(queries), num_classes))
    for row in range(len(queries)):
        for col in order[row]:
            scores[row, bank_labels[col]] += np.exp(sims[row, col] / temperature)
    return scores
