"""N-channel, high-bit-depth images (microscopy): decoding, per-channel statistics and normalisation.

RGB photos never come here: they keep the PIL + lightly path (``views.py``, ``eval.features.eval_transform``).
``ssl-hybrid shards --channels N`` reads each image as an array ``[C, H, W]`` (:func:`read_array`) and stores it
losslessly as a ``.npy`` tar member, in its own dtype (``uint8``, ``uint16`` or ``float32``). ``.npy`` rather
than ``.tiff``: numpy reads it with ``allow_pickle=False`` and no codec (no decoder attack surface, no tifffile in
the workers), and it costs a memcpy to decode; the price is no compression.

Accepted layouts (anything else is refused with one line naming the file and its shape):

- TIFF / OME-TIFF (``tifffile``, first series): ``YX`` (1 channel), ``CYX`` / ``YXS`` (channels or samples), a
  multi-page stack without OME metadata (pages = channels; tifffile's ``I``/``Q`` axis). Other axes (``Z``, ``T``...)
  must have length 1: a z-stack or a time series is not a channel axis.
- PNG and the other Pillow formats: 8/16-bit grayscale (1 channel), RGB (3), RGBA (4). Pillow reads 16-bit colour
  PNGs as 8-bit, so such files lose their bit depth: store them as TIFF.

Values are scaled by the dtype's range (``uint8`` / 255, ``uint16`` / 65535; floats as they are), and the
manifest records per-channel mean, std and 1st/99th percentiles of those values over a sample of images
(:class:`StatsAccumulator`). The stream and the evaluators normalise each channel with the mean/std of the
*pretraining* manifest (:class:`Normalization`); the model folder records them as ``pretrained_cfg`` mean/std.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_hybrid.errors import UserError

NPY_KEY = "npy"
NPY_MAGIC = b"\x93NUMPY"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# The dtypes stored as they are; the range each is scaled by before normalisation.
SCALES = {"uint8": 255.0, "uint16": 65535.0, "float32": 1.0}
CHANNEL_AXES = "CSIQ"  # tifffile's channel, sample, image-sequence (pages) and unknown axes
STATS_IMAGES = 256  # images the per-channel statistics are computed over (the first ones of the shuffled order)
STATS_PIXELS = 4096  # pixels per image and channel kept for the percentiles
MAX_CHANNELS = 64


class ChannelError(UserError):
    """An N-channel configuration, manifest or model that does not fit the data."""


# ---------------------------------------------------------------------------------------------
# Reading source files (shard writer)
# ---------------------------------------------------------------------------------------------


def read_array(data: bytes, name: str) -> np.ndarray:
    """A source image's pixels as ``[C, H, W]`` in a stored dtype; ValueError (one line) for other layouts."""
    if not data:
        raise ValueError("zero-byte file")
    array = _read_tiff(data, name) if data[:4] in TIFF_MAGICS else _read_pil(data)
    return _stored_dtype(array, name)


def _read_tiff(data: bytes, name: str) -> np.ndarray:
    import tifffile

    from ssl_hybrid.data.shards import MAX_IMAGE_PIXELS

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            too_large = math.prod(shape) > MAX_IMAGE_PIXELS * MAX_CHANNELS
            array = None if too_large else series.asarray()
    except Exception as err:  # tifffile raises TiffFileError, ValueError, struct.error, OSError... for bad bytes
        raise ValueError(f"{name}: not a readable TIFF ({type(err).__name__}: {err})") from None
    if array is None:
        raise ValueError(f"{name}: shape {shape} is larger than this tool reads (refused unread)")
    return _to_cyx(array, axes, name)


def wider_than_rgb(data: bytes) -> tuple[int, str] | None:
    """(channels, dtype) of an image 8-bit RGB cannot hold -- 16-bit or float pixels, or more channels than RGB(A)
    -- read from the TIFF header or Pillow's mode, without decoding the pixels; None for 8-bit RGB(A)/grayscale and
    for files neither can read (the writer reports those)."""
    if data[:4] not in TIFF_MAGICS:
        return _pil_wider(data)
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            shape, axes, dtype = tuple(series.shape), series.axes, series.dtype
    except Exception:  # unreadable TIFFs are skipped by the writer with its own reason
        return None
    channels = math.prod(n for n, axis in zip(shape, axes) if axis not in "YX")
    wide = dtype != np.uint8 or channels > (4 if "S" in axes else 3)  # 8-bit RGBA is an ordinary picture
    return (channels, dtype.name) if wide else None


def _pil_wider(data: bytes) -> tuple[int, str] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
    except Exception:
        return None
    return (1, "float32" if mode == "F" else "uint16") if mode in ("I", "F") or mode.startswith("I;16") else None


def ome_channel_names(path: Path, channels: int) -> list[str]:
    """The channel names an OME-TIFF's metadata gives (first image), when it names exactly ``channels``; else []."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.is_ome or not tif.ome_metadata:
                return []
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        image = image[0] if isinstance(image, list) else image
        entries = image["Pixels"]["Channel"]
        entries = entries if isinstance(entries, list) else [entries]
        names = [str(entry.get("Name") or "") for entry in entries]
    except Exception:  # not a TIFF, no or odd OME metadata: names are optional
        return []
    return names if len(names) == channels and all(names) else []


def _to_cyx(array: np.ndarray, axes: str, name: str) -> np.ndarray:
    """Drop length-1 axes other than Y/X, then accept YX, one channel-like axis + YX, or YX + samples."""
    keep = [i for i, axis in enumerate(axes) if axis in "YX" or array.shape[i] > 1]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    refusal = (
        f"{name}: TIFF axes {axes} shape {tuple(array.shape)} not accepted "
        "(expected YX, CYX, YXS or a multi-page stack; Z/T axes must have length 1)"
    )
    if axes == "YX":
        return array[None]
    if len(axes) == 3 and axes[1:] == "YX" and axes[0] in CHANNEL_AXES:
        return array
    if axes == "YXS":
        return np.moveaxis(array, -1, 0)
    raise ValueError(refusal)


def _read_pil(data: bytes) -> np.ndarray:
    from ssl_hybrid.data.shards import check_image_bytes

    image = check_image_bytes(data)
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    array = np.asarray(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L") and array.size and 0 <= array.min() and array.max() <= 65535:
        array = array.astype(np.uint16)  # 16-bit PNGs open as 32-bit 'I' in some Pillow versions
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def _stored_dtype(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype in (np.float16, np.float64):
        array = array.astype(np.float32)
    if array.dtype.name not in SCALES or array.ndim != 3:
        raise ValueError(
            f"{name}: {array.dtype} pixels of shape {tuple(array.shape)} not accepted (uint8, uint16 or float32)"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: non-finite pixel values")
    return np.ascontiguousarray(array)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes, max_pixels: int) -> np.ndarray:
    """A stored ``[C, H, W]`` array; ValueError for anything else (pickles, other dtypes and ranks, bombs)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # ValueError for pickles and bad headers, EOFError/OSError for cut data
        raise ValueError(f"not a readable .npy array ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.dtype.name not in SCALES:
        raise ValueError(f"stored array {getattr(array, 'dtype', '?')} {getattr(array, 'shape', '?')} is not [C, H, W]")
    channels, height, width = array.shape
    if not 1 <= channels <= MAX_CHANNELS or height * width > max_pixels or min(height, width) < 1:
        raise ValueError(f"stored array of shape {array.shape} refused")
    return array


def scaled(array: np.ndarray):
    """``[C, H, W]`` float32 tensor of the array scaled by its dtype's range."""
    import torch

    return torch.from_numpy(array.astype(np.float32, copy=False)) / SCALES[array.dtype.name]


def preview(array: np.ndarray):
    """An 8-bit RGB picture of a ``[C, H, W]`` array for grids and thumbnails only (never for a model): the first
    three channels (one channel as gray), each stretched between its own 1st and 99th percentile."""
    from PIL import Image

    values = array[:3].astype(np.float32)
    low = np.percentile(values, 1, axis=(1, 2), keepdims=True)
    high = np.percentile(values, 99, axis=(1, 2), keepdims=True)
    stretched = np.clip((values - low) / np.maximum(high - low, 1e-12), 0, 1)
    rgb = np.repeat(stretched, 3, axis=0) if len(stretched) == 1 else stretched
    rgb = np.concatenate([rgb, np.zeros_like(rgb[:1])]) if len(rgb) == 2 else rgb
    return Image.fromarray((np.moveaxis(rgb, 0, -1) * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Per-channel statistics (manifest)
# ---------------------------------------------------------------------------------------------


class StatsAccumulator:
    """Exact per-channel mean/std (float64 sums) over the first ``max_images`` arrays; percentiles over a seeded
    subsample of each image's pixels."""

    def __init__(self, max_images: int = STATS_IMAGES, seed: int = 0):
        self.max_images, self.rng = max_images, np.random.default_rng(seed)
        self.images, self.count = 0, 0
        self.sums: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.samples: list[np.ndarray] = []

    def add(self, array: np.ndarray) -> None:
        if self.images >= self.max_images:
            return
        values = (array.astype(np.float64) / SCALES[array.dtype.name]).reshape(array.shape[0], -1)  # [C, H*W]
        if self.sums is not None and len(self.sums) != len(values):
            return  # a different channel count is skipped by the writer before it gets here
        self.sums = values.sum(axis=1) + (0 if self.sums is None else self.sums)
        self.squares = (values**2).sum(axis=1) + (0 if self.squares is None else self.squares)
        self.count += values.shape[1]
        pick = self.rng.choice(values.shape[1], size=min(STATS_PIXELS, values.shape[1]), replace=False)
        self.samples.append(values[:, pick])
        self.images += 1

    def result(self) -> dict[str, Any]:
        if self.sums is None or self.squares is None:
            return {}
        mean = self.sums / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean**2, 0.0))
        pixels = np.concatenate(self.samples, axis=1)
        return {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "p01": [float(v) for v in np.percentile(pixels, 1, axis=1)],
            "p99": [float(v) for v in np.percentile(pixels, 99, axis=1)],
            "images": self.images,
            "scale": "values divided by the dtype's range (uint8: 255, uint16: 65535; floats as stored)",
        }


# ---------------------------------------------------------------------------------------------
# Normalisation: from a manifest (training) or a model's record (evaluation)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std of scaled values, and the channel names, that a model was pretrained with."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    names: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return len(self.mean)

    def record(self) -> dict[str, Any]:
        return {"channels": self.channels, **{k: list(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> Normalization | None:
        if not record or "mean" not in record:
            return None
        return cls(tuple(record["mean"]), tuple(safe_std(record["std"])), tuple(record.get("names") or ()))

    def apply(self, pixels):
        """[C, H, W] scaled float tensor -> normalised; ValueError when the channel count differs."""
        if pixels.shape[0] != self.channels:
            raise ValueError(f"{pixels.shape[0]} channels, expected {self.channels}")
        mean = pixels.new_tensor(self.mean)[:, None, None]
        std = pixels.new_tensor(self.std)[:, None, None]
        return (pixels - mean) / std


def safe_std(std) -> list[float]:
    """A channel that is constant over the sample has std 0: divide by 1 there rather than by 0."""
    return [float(v) if v > 1e-12 else 1.0 for v in std]


def manifest_normalization(manifest: dict[str, Any]) -> Normalization | None:
    """The N-channel normalisation a manifest records (None for shards of ordinary images)."""
    stats = manifest.get("channel_stats")
    if not stats:
        return None
    return Normalization(
        tuple(stats["mean"]), tuple(safe_std(stats["std"])), tuple(manifest.get("channel_names") or ())
    )


def check_channel_config(
    channels: int, names, channels_key: str = "data.channels", names_key: str = "data.channel_names"
) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise ChannelError(f"{channels_key} must be in 1..{MAX_CHANNELS}, got {channels}")
    if names and len(names) != channels:
        raise ChannelError(f"{names_key} has {len(names)} names for {channels_key} {channels}; give one per channel")


def stream_normalization(data_cfg) -> Normalization | None:
    """The pretraining data's normalisation, from the manifest next to ``data.train``'s shards, checked against
    ``data.channels``. None for shards of ordinary images with ``data.channels=3`` (the RGB path)."""
    from ssl_hybrid.data.shards import is_url
    from ssl_hybrid.data.sources import folder_channels, resolve_shards

    check_channel_config(data_cfg.channels, data_cfg.channel_names)
    urls = resolve_shards(data_cfg.train, data_cfg.allow_pipe_in_lists, folder_channels(data_cfg))
    manifest_path = Path(urls[0]).parent / "manifest.json" if urls and not is_url(urls[0]) else None
    manifest = _read_json(manifest_path) if manifest_path is not None and manifest_path.exists() else {}
    norm = manifest_normalization(manifest)
    if norm is None:
        if data_cfg.channels != 3:
            raise ChannelError(
                f"data.channels={data_cfg.channels}, but {data_cfg.train} holds no N-channel shards "
                f"(write them with: ssl-hybrid shards --channels {data_cfg.channels} ...)"
            )
        return None
    if norm.channels != data_cfg.channels:
        raise ChannelError(
            f"data.channels={data_cfg.channels}, but {manifest_path} records {norm.channels}-channel images"
        )
    names = tuple(data_cfg.channel_names) or norm.names
    return Normalization(norm.mean, norm.std, names)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ChannelError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------------
# Tensor transforms for arrays (per image; the batched device augmentation takes their output)
# ---------------------------------------------------------------------------------------------


# Crop scale ranges per view recipe (lightly's defaults for the global/local crops of each).
_GLOBAL_SCALE = {"dino": (0.4, 1.0), "mae": (0.2, 1.0)}
_LOCAL_SCALE = (0.05, 0.4)


class ArrayViews:
    """``[C, H, W]`` array -> ``{"global_views": [Tensor[C,S,S]], "local_views": [...]}``: random resized crop
    (bilinear, antialiased), horizontal flip and per-channel normalisation, drawn from torch's global RNG (the
    stream seeds it per sample, so resume stays exact). Photometric jitter is left to the batched augmentation."""

    def __init__(self, data_cfg, norm: Normalization):
        self.norm = norm
        self.size, self.local_size = data_cfg.image_size, data_cfg.local_image_size
        self.num_global = 1 if data_cfg.views == "mae" else 2
        self.num_local = 0 if data_cfg.views == "mae" else data_cfg.num_local_views
        simclr = (data_cfg.simclr_min_scale, 1.0)
        self.global_scale = _GLOBAL_SCALE.get(data_cfg.views, simclr)
        self.local_scale = (
            (data_cfg.simclr_local_min_scale, data_cfg.simclr_min_scale) if data_cfg.views == "simclr" else _LOCAL_SCALE
        )

    def __call__(self, array) -> dict:
        pixels = self.norm.apply(scaled(_array(array)))  # [C, H, W]
        return {
            "global_views": [random_view(pixels, self.size, self.global_scale) for _ in range(self.num_global)],
            "local_views": [random_view(pixels, self.local_size, self.local_scale) for _ in range(self.num_local)],
        }


def _array(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"a {getattr(image, 'mode', type(image).__name__)} image where N-channel arrays are expected "
            "(shard N-channel images with ssl-hybrid shards --channels)"
        )
    return image


def random_view(pixels, size: int, scale: tuple[float, float]):
    """Random resized crop (timm/torchvision's ratio 3/4..4/3) + horizontal flip of a ``[C, H, W]`` tensor."""
    import torch
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms import functional as F

    top, left, height, width = RandomResizedCrop.get_params(pixels, list(scale), [3 / 4, 4 / 3])
    view = F.resized_crop(pixels, top, left, height, width, [size, size], antialias=True)
    return view.flip(-1) if torch.rand(()) < 0.5 else view


class ArrayTrainTransform:
    """Fine-tuning's crop + flip + per-channel normalisation for arrays (one ``[C, S, S]`` tensor)."""

    takes_arrays = True  # labeled sets hand it arrays (TorchLabeledDataset)

    def __init__(self, image_size: int, min_scale: float, norm: Normalization):
        self.size, self.scale, self.norm = image_size, (min_scale, 1.0), norm

    def __call__(self, array):
        return random_view(self.norm.apply(scaled(_array(array))), self.size, self.scale)


class ArrayEvalTransform:
    """The evaluators' transform for arrays: shorter side to ``round(size / crop_pct)`` (bilinear, antialiased),
    centre crop, per-channel normalisation -- ``eval_transform``'s geometry on ``[C, H, W]``."""

    takes_arrays = True  # labeled sets hand it arrays (TorchLabeledDataset)

    def __init__(self, image_size: int, norm: Normalization, crop_pct: float):
        self.size, self.norm = image_size, norm
        self.side = int(round(image_size / crop_pct))

    def __call__(self, array):
        from torchvision.transforms import functional as F

        pixels = self.norm.apply(scaled(_array(array)))
        height, width = pixels.shape[-2:]
        short = min(height, width)
        size = [max(1, round(height * self.side / short)), max(1, round(width * self.side / short))]
        return F.center_crop(F.resize(pixels, size, antialias=True), [self.size, self.size])

    def __repr__(self) -> str:  # part of the feature-cache key
        return f"ArrayEvalTransform(size={self.size}, side={self.side}, mean={self.norm.mean}, std={self.norm.std})"
