"""``ssl-hybrid make-demo microscopy``: a generated 16-bit, 5-channel cell image set that no 8-bit RGB pipeline can
learn, written as OME-TIFF (``<out>/{train,test}/<class>/<id>.ome.tif``) and, with ``rgb=True``, as the 8-bit RGB
composites an RGB tool would be given (``<out>/rgb/{train,test}/<class>/<id>.png``).

Every image has nuclei (channel 0), cytoplasm (1), a membrane-like field (2) and speckles (3), drawn alike for
every class. The classes differ only in channel 4, a dim marker: none (``negative``), in the nuclei
(``nuclear``) or in the cytoplasm (``cytoplasmic``), ``MARKER`` counts above a background of ``BACKGROUND``
counts: every value of that channel stays below 256 of 65,535, so converting to 8 bits (value / 256) makes it 0
in every image of every class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("negative", "nuclear", "cytoplasmic")
CHANNEL_NAMES = ("nuclei", "cytoplasm", "membrane", "speckles", "marker")
BACKGROUND, NOISE, MARKER = 60.0, 8.0, 80.0  # the marker channel in 16-bit counts: max < 256
SIDE = 64  # px: a few cells per image, and a CPU pretraining step of 32-px crops in about a second


def _discs(rng: np.random.Generator, size: int, count: int, radius: tuple[int, int], grow: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    centres = rng.uniform(0, size, (count, 2))
    radii = rng.uniform(*radius, count)
    for (cy, cx), r in zip(centres, radii):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + grow) ** 2
    return mask


def _smooth(rng: np.random.Generator, size: int, cells: int = 8) -> np.ndarray:
    coarse = rng.random((cells, cells))
    return np.kron(coarse, np.ones((size // cells + 1, size // cells + 1)))[:size, :size]


def cell_image(rng: np.random.Generator, label: int, size: int = SIDE) -> np.ndarray:
    """One ``[5, size, size]`` uint16 image of class ``CLASSES[label]``."""
    count = int(rng.integers(3, 7))
    state = rng.bit_generator.state  # the same centres for nuclei and their cytoplasm
    nuclei = _discs(rng, size, count, (4, 7))
    rng.bit_generator.state = state
    cytoplasm = _discs(rng, size, count, (4, 7), grow=5) & ~nuclei
    noise = rng.normal(0, 1, (5, size, size))
    channels = [
        1500 + 24000 * nuclei * (0.7 + 0.3 * _smooth(rng, size, 16)) + 400 * noise[0],
        1200 + 9000 * cytoplasm + 2500 * nuclei + 300 * noise[1],
        3000 + 12000 * _smooth(rng, size) + 500 * noise[2],
        800 + 30000 * (rng.random((size, size)) > 0.985) + 200 * noise[3],
        BACKGROUND + NOISE * noise[4] + MARKER * ((nuclei, cytoplasm)[label - 1] if label else 0),
    ]
    image = np.clip(np.stack(channels), 0, 65535).astype(np.uint16)
    assert image[4].max() < 256, "the marker must vanish in 8 bits"
    return image


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """The 8-bit RGB composite a viewer exports: nuclei red, marker green, cytoplasm blue, each value / 256."""
    return np.stack([image[0], image[4], image[1]], axis=-1) // 256  # [H, W, 3]


def make_microscopy(
    out: str | Path, per_class: int = 60, test_per_class: int = 30, size: int = SIDE, seed: int = 0, rgb: bool = True
) -> dict:
    """Write the set; returns counts per split. Seeded: the same arguments give the same files."""
    import tifffile
    from PIL import Image

    out = Path(out)
    rng = np.random.default_rng(seed)
    counts = {}
    for split, number in (("train", per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(number):
                image = cell_image(rng, label, size)
                stem = f"{name}_{index:04d}"
                metadata = {"axes": "CYX", "Channel": {"Name": list(CHANNEL_NAMES)}}
                tifffile.imwrite(folder / f"{stem}.ome.tif", image, ome=True, metadata=metadata)
                if rgb:
                    (out / "rgb" / split / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(to_rgb8(image).astype(np.uint8)).save(out / "rgb" / split / name / f"{stem}.png")
        counts[split] = number * len(CLASSES)
    return counts
