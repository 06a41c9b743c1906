"""N-channel, 16-bit images (ssl_hybrid.data.channels): every accepted file layout is read as [C, H, W] in its own
dtype, other layouts are refused with one line naming the file and shape, ``ssl-hybrid shards --channels`` stores
the pixels exactly with per-channel statistics in the manifest, and the stream and the evaluators normalise with
them. The demonstration set's dim marker channel vanishes in 8 bits and survives here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from ssl_hybrid.data import channels as ch
from ssl_hybrid.data.shards import ShardWriteError, sample_key, write_shards
from ssl_hybrid.data.stream import build_train_stream, decode_image_or_reason, read_shard
from ssl_hybrid.errors import UserError


def tiff_bytes(array: np.ndarray, **options) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def stack_bytes(pages: list[np.ndarray]) -> bytes:
    """A multi-page TIFF without shape metadata: one page per channel, as acquisition software writes them."""
    import tifffile

    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for page in pages:
            tif.write(page, metadata=None)
    return buffer.getvalue()


def png16_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(shape, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    high = 65535 if dtype == np.uint16 else 255
    return np.random.default_rng(seed).integers(0, high + 1, shape).astype(dtype)


CYX = pixels((5, 12, 10))


@pytest.mark.parametrize(
    "name, data, expected",
    [
        ("yx 16-bit tiff", lambda: tiff_bytes(CYX[0]), CYX[:1]),
        ("ome-tiff CYX", lambda: tiff_bytes(CYX, ome=True, metadata={"axes": "CYX"}), CYX),
        ("ome-tiff TCZYX, T=Z=1", lambda: tiff_bytes(CYX[None, :, None], ome=True, metadata={"axes": "TCZYX"}), CYX),
        ("multi-page stack", lambda: stack_bytes(list(CYX)), CYX),
        ("rgb 16-bit tiff (YXS)", lambda: tiff_bytes(np.moveaxis(CYX[:3], 0, -1), photometric="rgb"), CYX[:3]),
        ("16-bit png", lambda: png16_bytes(CYX[1]), CYX[1:2]),
        ("8-bit rgb png", lambda: png16_bytes(np.moveaxis(CYX[:3] // 256, 0, -1).astype(np.uint8)),
         (CYX[:3] // 256).astype(np.uint8)),
    ],
)
def test_accepted_layouts_read_as_cyx_in_their_own_bit_depth(name, data, expected):
    array = ch.read_array(data(), f"{name}.tif")
    assert array.dtype == expected.dtype and array.shape == expected.shape
    np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize(
    "data, words",
    [
        (lambda: tiff_bytes(pixels((3, 2, 8, 8)), ome=True, metadata={"axes": "ZCYX"}), "ZCYX"),
        (lambda: tiff_bytes(pixels((8, 8), np.int32)), "int32"),
        (lambda: tiff_bytes(CYX)[:300], "not a readable TIFF"),
    ],
)
def test_other_layouts_are_refused_with_one_line_naming_file_and_shape(data, words):
    with pytest.raises(ValueError) as info:
        ch.read_array(data(), "cell_007.tif")
    message = str(info.value)
    assert words in message and "\n" not in message
    assert "cell_007.tif" in message or "TIFF" in message


def write_cells(root: Path, arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiff_bytes(array, ome=True, metadata={"axes": "CYX"}))


def stored_arrays(out: Path) -> dict[str, np.ndarray]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for sample in read_shard(str(shard)):
            array, reason = decode_image_or_reason(sample)
            assert reason is None, reason
            found[sample["__key__"]] = array
    return found


def test_shards_keep_16_bit_pixels_exactly_and_record_per_channel_statistics(tmp_path):
    arrays = {f"{label}/cell_{i}.ome.tif": pixels((5, 16 + i, 12), seed=i) for i, label in enumerate("aabb")}
    write_cells(tmp_path / "src", arrays)
    manifest = write_shards(tmp_path / "src", tmp_path / "out", shard_size=3, channels=5,
                            channel_names=list("ABCDE"), progress=False)
    stored = stored_arrays(tmp_path / "out")
    assert len(stored) == 4
    for name, array in arrays.items():
        np.testing.assert_array_equal(stored[sample_key(name)], array)  # every value
        assert stored[sample_key(name)].dtype == np.uint16
    scaled = np.concatenate([a.reshape(5, -1) / 65535.0 for a in arrays.values()], axis=1)
    stats = manifest["channel_stats"]
    np.testing.assert_allclose(stats["mean"], scaled.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], scaled.std(axis=1), rtol=1e-6)
    assert stats["images"] == 4 and manifest["channels"] == 5 and manifest["channel_names"] == list("ABCDE")
    assert all(lo <= hi for lo, hi in zip(stats["p01"], stats["p99"]))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["channel_stats"] == stats


def test_channel_names_come_from_ome_metadata_when_not_given(tmp_path):
    (tmp_path / "src").mkdir()
    names = {"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP", "RFP"]}}
    (tmp_path / "src" / "x.ome.tif").write_bytes(tiff_bytes(pixels((3, 8, 8)), ome=True, metadata=names))
    assert write_shards(tmp_path / "src", tmp_path / "a", channels=3, progress=False)["channel_names"] == [
        "DAPI", "GFP", "RFP"]
    given = write_shards(tmp_path / "src", tmp_path / "b", channels=3, channel_names=["x", "y", "z"], progress=False)
    assert given["channel_names"] == ["x", "y", "z"]


@pytest.mark.fault(injected="a truncated TIFF, a 4-channel and a 5-channel image of another size among 5-channel "
                            "TIFFs (shards --channels 5)",
                   did="the truncated and the 4-channel file skipped and listed in the manifest with a one-line "
                       "reason naming the shape and --channels; a different image size is kept",
                   lost="only the two unusable files")
def test_shard_writer_skips_truncated_and_wrong_channel_count_files(tmp_path):
    good = {f"cell_{i}.ome.tif": pixels((5, 12, 12), seed=i) for i in range(3)}
    good["big.ome.tif"] = pixels((5, 20, 16), seed=9)
    write_cells(tmp_path / "src", good)
    (tmp_path / "src" / "cut.tif").write_bytes(tiff_bytes(pixels((5, 12, 12)))[:200])
    (tmp_path / "src" / "four.tif").write_bytes(tiff_bytes(pixels((4, 12, 12)), ome=True, metadata={"axes": "CYX"}))
    manifest = write_shards(tmp_path / "src", tmp_path / "out", channels=5, progress=False)
    assert manifest["num_samples"] == 4
    reasons = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == {"cut.tif", "four.tif"}
    assert "(4, 12, 12)" in reasons["four.tif"] and "--channels 5" in reasons["four.tif"]
    assert "TIFF" in reasons["cut.tif"] and all("\n" not in r for r in reasons.values())


@pytest.mark.fault(injected="shards WITHOUT --channels on a folder of 16-bit 5-page TIFF stacks, a 16-bit grayscale "
                            "PNG, a 5-channel OME-TIFF and an 8-bit RGB PNG",
                   did="one warning line: how many images are 16-bit/float/over 3 channels, that they become 8-bit "
                       "RGB, an example file and --channels N to keep them; the shard set is written as before",
                   lost="nothing silently: the 8-bit RGB conversion the user is told about")
def test_shards_without_channels_warn_once_that_wide_images_become_8_bit_rgb(tmp_path, caplog):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"stack{i}.tif").write_bytes(stack_bytes(list(pixels((5, 12, 12), seed=i))))
    (src / "gray16.png").write_bytes(png16_bytes(pixels((12, 12), seed=3)))
    (src / "five.ome.tif").write_bytes(tiff_bytes(pixels((5, 12, 12), seed=4), ome=True, metadata={"axes": "CYX"}))
    Image.new("RGB", (12, 12), (200, 10, 10)).save(src / "photo.png")
    caplog.set_level("WARNING", logger="ssl_hybrid.data.shards")
    manifest = write_shards(src, tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 5 and "channels" not in manifest  # the RGB set, as before
    warned = [r.getMessage() for r in caplog.records if "8-bit RGB" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("4 images are 16-bit") and "--channels 5 keeps" in warned[0]
    assert "five.ome.tif: 5 x uint16" in warned[0] and "\n" not in warned[0]
    caplog.clear()
    write_shards(src, tmp_path / "wide", channels=5, progress=False)  # what the warning advises: no warning
    assert not [r for r in caplog.records if "8-bit RGB" in r.getMessage()]


@pytest.mark.fault(injected="shards --channels 3 on a folder of 5-channel TIFFs; --channel-names of the wrong "
                            "length; --max-side with --channels",
                   did="one-line error naming the first file, its shape and --channels (nothing written)",
                   lost="nothing")
def test_shard_writer_refuses_a_wrong_channel_count_with_one_line(tmp_path):
    write_cells(tmp_path / "src", {"x.ome.tif": pixels((5, 8, 8))})
    with pytest.raises(ShardWriteError) as info:
        write_shards(tmp_path / "src", tmp_path / "out", channels=3, progress=False)
    assert "x.ome.tif" in str(info.value) and "(5, 8, 8)" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--channel-names has 2 names"):
        write_shards(tmp_path / "src", tmp_path / "out", channels=5, channel_names=["a", "b"], progress=False)
    with pytest.raises(ShardWriteError, match="--max-side"):
        write_shards(tmp_path / "src", tmp_path / "out", channels=5, max_side=64, progress=False)


def test_stored_arrays_refuse_pickles_and_other_shapes():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for data in (buffer.getvalue(), ch.encode_npy(np.zeros((4, 4), np.uint16)), ch.encode_npy(np.zeros((2, 4, 4)))):
        with pytest.raises(ValueError):
            ch.decode_npy(data, 10_000)


@pytest.fixture
def cell_shards(tmp_path) -> Path:
    arrays = {f"{'ab'[i % 2]}/c{i}.ome.tif": pixels((5, 40, 40), seed=i) for i in range(8)}
    write_cells(tmp_path / "src", arrays)
    write_shards(tmp_path / "src", tmp_path / "shards", shard_size=2, channels=5, progress=False)
    return tmp_path / "shards"


@pytest.mark.fault(injected="one stored .npy member of a 5-channel shard cut in half",
                   did="the stream skips and counts that sample (warning naming url and key); the others train",
                   lost="that sample")
def test_stream_normalises_per_channel_and_skips_a_corrupt_array(cell_shards, tiny_cfg, tmp_path):
    import tarfile

    import torch

    from ssl_hybrid.data.views import build_transform

    cfg = tiny_cfg(cell_shards, channels=5)
    norm = ch.stream_normalization(cfg)
    assert norm is not None and norm.channels == 5
    # the manifest's statistics cover every image here: normalised, each channel has mean 0 and std 1 over the set
    everything = torch.cat([norm.apply(ch.scaled(a)).flatten(1) for a in stored_arrays(cell_shards).values()], 1)
    torch.testing.assert_close(everything.mean(1), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(everything.std(1), torch.ones(5), atol=1e-3, rtol=0)
    shard = sorted(cell_shards.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        cut = next(m.name for m, _ in members if m.name.endswith(".npy"))
        for member, data in members:
            data = data[: len(data) // 2] if member.name == cut else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    stream = build_train_stream(cfg, 7, 0, 0, 1, build_transform(cfg, norm), epochs=1)
    batches = list(stream)
    views = batches[0]["global_views"]
    assert len(views) == 2 and views[0].shape == (7, 5, 32, 32) and views[0].dtype == torch.float32
    assert stream.stats()["skipped"] == 1 and stream.stats()["seen"] == 8
    assert views[0].mean(dim=(0, 2, 3)).abs().max() < 0.35  # centred per channel (crops and resizing move it a bit)



@pytest.mark.fault(injected="data.channels=5 with RGB shards, data.channels=4 with 5-channel shards, "
                            "data.channel_names of the wrong length",
                   did="one-line error before any training (names the setting, the shards and how to write them)",
                   lost="nothing")
def test_channel_settings_that_do_not_fit_the_data_are_refused(cell_shards, good_shards, tiny_cfg):
    from ssl_hybrid.config import ConfigError, load_config, validate

    with pytest.raises(ch.ChannelError, match="ssl-hybrid shards --channels 5"):
        ch.stream_normalization(tiny_cfg(good_shards, channels=5))
    with pytest.raises(ch.ChannelError, match="records 5-channel images"):
        ch.stream_normalization(tiny_cfg(cell_shards, channels=4))
    assert ch.stream_normalization(tiny_cfg(good_shards)) is None  # RGB photos: today's path
    with pytest.raises(ConfigError, match="data.channel_names"):
        validate(load_config(None, ["data.channels=5", "data.channel_names=[a,b]"]))


@pytest.mark.fault(injected="data.train = a folder of 5-channel 16-bit TIFFs with data.channels=5, and with "
                            "data.channels=4",
                   did="the folder is sharded into the cache as 5-channel arrays (the trainer's stream and statistics "
                       "read them); with 4 one line naming a file and its 5 channels, and nothing left in the cache "
                       "(it was converted to RGB shards first, then refused)",
                   lost="nothing")
def test_a_tiff_folder_as_data_train_is_sharded_with_its_channels_before_anything_is_written(tmp_path, tiny_cfg):
    from ssl_hybrid.data.views import build_transform

    write_cells(tmp_path / "cells", {f"c{i}.ome.tif": pixels((5, 20, 20), seed=i) for i in range(4)})
    cache = tmp_path / "cache" / "shards"
    with pytest.raises(UserError, match=r"c\d\.ome\.tif: 5 channels \(shape \(5, 20, 20\)\), --channels 4"):
        ch.stream_normalization(tiny_cfg(tmp_path / "cells", channels=4))
    assert not cache.exists() or not list(cache.iterdir())  # refused before anything was written
    cfg = tiny_cfg(tmp_path / "cells", channels=5)
    norm = ch.stream_normalization(cfg)
    assert norm is not None and norm.channels == 5
    assert [p.name.rsplit("-", 1)[1] for p in cache.iterdir()] == ["c5"]  # one N-channel set, no RGB one
    batch = next(iter(build_train_stream(cfg, 2, 0, 0, 1, build_transform(cfg, norm), epochs=1)))
    assert batch["global_views"][0].shape == (2, 5, 32, 32)


def test_rgb_photos_keep_todays_transforms(tiny_cfg, good_shards):
    from ssl_hybrid.data.views import NamedViews, build_transform
    from ssl_hybrid.eval.features import eval_transform, transform_for

    assert isinstance(build_transform(tiny_cfg(good_shards)), NamedViews)
    assert repr(transform_for({}, 32)) == repr(eval_transform(32))


# ------------------------------------------------------------------------------------------- the demonstration


def test_demo_marker_vanishes_in_8_bits_and_survives_in_the_shards(tmp_path):
    from PIL import Image

    from ssl_hybrid.data.demo import CLASSES, make_microscopy

    make_microscopy(tmp_path / "cells", per_class=3, test_per_class=1, size=32)
    sources = sorted((tmp_path / "cells" / "train").rglob("*.tif"))
    assert len(sources) == 9
    # 8-bit RGB conversion: the marker (green) is 0 in every image of every class
    composites = sorted((tmp_path / "cells" / "rgb" / "train").rglob("*.png"))
    assert all(np.asarray(Image.open(p))[..., 1].max() == 0 for p in composites)
    manifest = write_shards(tmp_path / "cells" / "train", tmp_path / "shards", channels=5, progress=False)
    stored = stored_arrays(tmp_path / "shards")
    import tifffile

    for path in sources:  # the 16-bit dim channel is stored exactly
        key = sample_key(path.relative_to(tmp_path / "cells" / "train").as_posix())
        np.testing.assert_array_equal(stored[key], tifffile.imread(path))
    # ... and, normalised per channel from the manifest, it tells the classes apart: the marker's mean over each
    # cell mask is far above background for 'nuclear'/'cytoplasmic', at background for 'negative'
    norm = ch.manifest_normalization(manifest)
    marker = {key: float(norm.apply(ch.scaled(a))[4].max()) for key, a in stored.items()}
    negative = [v for k, v in marker.items() if k.startswith(CLASSES[0])]
    positive = [v for k, v in marker.items() if not k.startswith(CLASSES[0])]
    assert max(negative) < min(positive)


# ------------------------------------------------------------------------------------------- models and evaluation


@pytest.mark.parametrize("name", ["hybrid_nano", "resvit_nano"])
def test_both_families_take_five_channels_through_masked_forward_mim_export_and_load(name, tmp_path):
    import timm
    import torch

    import ssl_hybrid.models  # noqa: F401
    from ssl_hybrid.models.export import load_model, save_model_folder
    from ssl_hybrid.models.factory import create_backbone
    from ssl_hybrid.objectives.mim import MIMObjective

    model = create_backbone(name, 32, in_chans=5)
    images = torch.randn(2, 5, 32, 32)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)  # [B, grid_h, grid_w], 3 of 4 patches hidden
    mask[:, 0] = True
    mask[:, 1, 0] = True
    out = model.forward_masked(images, mask)
    dim = out["fused"].shape[-1]
    loss = MIMObjective(dim, 32, 16, 1, True, in_chans=5)(out, images)["mim"]
    assert torch.isfinite(loss)
    norm = ch.Normalization((0.1,) * 5, (0.2,) * 5, tuple("ABCDE"))
    folder = save_model_folder(model, tmp_path / "m", extra={"image_size": 32, "normalization": norm.record()})
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 5 and config["pretrained_cfg"]["input_size"][0] == 5
    assert config["pretrained_cfg"]["mean"] == [0.1] * 5 and config["ssl_hybrid"]["normalization"]["names"] == list("ABCDE")
    loaded, _ = load_model(folder)
    timm_loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model(images))
        torch.testing.assert_close(timm_loaded.eval()(images), model(images))


def test_evaluators_use_the_recorded_normalisation_on_five_channel_shards(cell_shards, tmp_path):
    import torch

    import ssl_hybrid.models  # noqa: F401
    from ssl_hybrid.data.labeled import load_labeled
    from ssl_hybrid.data.shards import read_manifest
    from ssl_hybrid.eval.embed import load_embedder
    from ssl_hybrid.eval.features import features_for_spec
    from ssl_hybrid.models.export import save_model_folder
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(0)
    norm = ch.manifest_normalization(read_manifest(cell_shards))
    folder = save_model_folder(create_backbone("resvit_nano", 32, in_chans=5), tmp_path / "m",
                               extra={"image_size": 32, "normalization": norm.record()})
    labeled = load_labeled(cell_shards)
    meta, [(features, labels)] = features_for_spec(str(folder), [labeled], batch_size=4)
    assert features.shape[0] == 8 and np.isfinite(features).all() and meta["normalization"]["channels"] == 5
    embedder = load_embedder(str(folder), 32, batch_size=4, num_workers=0)
    np.testing.assert_allclose(embedder.features(labeled), features / np.linalg.norm(features, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-5)
    assert embedder.describe()["preprocessing"]["mean"] == list(norm.mean)
    picture = labeled.load_picture(0)  # grids and thumbnails show a preview
    assert picture.mode == "RGB" and picture.size == (40, 40)


def test_model_card_of_a_five_channel_model_shows_code_that_embeds_a_tiff_as_the_evaluators_do(cell_shards, tmp_path):
    """The exported folder's README is what a timm user reads: its snippet (timm's RGB transform before) must
    turn a 16-bit 5-channel TIFF into the embedding the evaluators compute for that file."""
    import re

    import torch

    import ssl_hybrid.models  # noqa: F401
    from ssl_hybrid.data.labeled import load_labeled
    from ssl_hybrid.data.shards import read_manifest
    from ssl_hybrid.eval.embed import load_embedder
    from ssl_hybrid.models.export import save_model_folder
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(0)
    norm = ch.manifest_normalization(read_manifest(cell_shards))
    folder = save_model_folder(create_backbone("resvit_nano", 32, in_chans=5), tmp_path / "m",
                               extra={"image_size": 32, "normalization": norm.record()})
    write_cells(tmp_path / "one", {"x/cell.tif": pixels((5, 44, 40), seed=9)})
    image = tmp_path / "one" / "x" / "cell.tif"
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    snippet = snippet.replace("<this folder>", str(folder)).replace('"image.tif"', repr(str(image)))
    scope: dict = {}
    with torch.no_grad():
        exec(snippet, scope)  # noqa: S102 - the card's own code, as a user runs it
    out = scope["out"].numpy()
    expected = load_embedder(str(folder), 32, pooling="default", batch_size=1).features(load_labeled(tmp_path / "one"))
    np.testing.assert_allclose(out / np.linalg.norm(out, axis=1, keepdims=True), expected, rtol=1e-4, atol=1e-5)


def test_float32_tiffs_that_pillow_cannot_open_are_read_by_the_evaluators_of_a_four_channel_model(tmp_path):
    """``shards --channels`` takes float32 TIFFs (4 samples per pixel: Pillow has no such mode); the evaluators' readability check (Pillow) refused them all."""
    import torch

    import ssl_hybrid.models  # noqa: F401
    from ssl_hybrid.data.labeled import check_images, load_labeled
    from ssl_hybrid.eval.features import features_for_spec
    from ssl_hybrid.models.export import save_model_folder
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for i in range(4):
        path = tmp_path / "cells" / "ab"[i % 2] / f"c{i}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        array = rng.random((4, 36, 36), dtype=np.float32)
        path.write_bytes(tiff_bytes(array, photometric="rgb", planarconfig="separate", extrasamples=["unspecified"]))
    norm = ch.Normalization((0.5,) * 4, (0.3,) * 4)
    folder = save_model_folder(create_backbone("resvit_nano", 32, in_chans=4), tmp_path / "m",
                               extra={"image_size": 32, "normalization": norm.record()})
    labeled = check_images(load_labeled(tmp_path / "cells"))
    assert len(labeled) == 4 and not labeled.skipped
    _, [(features, labels)] = features_for_spec(str(folder), [labeled], batch_size=4)
    assert features.shape[0] == 4 and np.isfinite(features).all() and sorted(labels) == [0, 0, 1, 1]


@pytest.mark.fault(injected="among 5-channel 16-bit TIFFs given to knn and embed of a 5-channel model: a 5-page TIFF cut "
                            "by one byte (Pillow opens its first page, tifffile refuses it) and an OME-TIFF cut in half "
                            "(its metadata lost, it reads as one channel)",
                   did="each skipped before extraction with a one-line warning naming the file and the reason, "
                       "counted in skipped_unreadable (refused above data.max_skip_rate); knn and embed finish",
                   lost="only the bad images")
def test_a_corrupt_tiff_pillow_opens_is_skipped_by_the_n_channel_evaluators(tmp_path, capsys):
    import torch

    import ssl_hybrid.models  # noqa: F401
    from ssl_hybrid.cli import main
    from ssl_hybrid.data.labeled import LabeledDataError, check_images, load_labeled
    from ssl_hybrid.models.export import save_model_folder
    from ssl_hybrid.models.factory import create_backbone

    torch.manual_seed(0)
    model = save_model_folder(create_backbone("resvit_nano", 32, in_chans=5), tmp_path / "m",
                              extra={"image_size": 32, "normalization": ch.Normalization((0.5,) * 5, (0.3,) * 5).record()})
    cells = tmp_path / "cells"
    write_cells(cells, {f"{'ab'[i % 2]}/c{i}.ome.tif": pixels((5, 36, 36), seed=i) for i in range(10)})
    (cells / "b" / "cut.tif").write_bytes(stack_bytes(list(pixels((5, 36, 36), seed=11)))[:-1])
    assert not check_images(load_labeled(cells)).skipped  # Pillow's RGB check passes it: the old pre-check
    assert main(["-q", "knn", str(model), "--train", str(cells), "--test", str(cells), "--no-cache",
                 "--batch-size", "4", "--out", str(tmp_path / "knn.json")]) == 0
    skipped = json.loads((tmp_path / "knn.json").read_text())["skipped_unreadable"]
    assert [item["id"] for item in skipped["train"]] == ["b/cut.tif"] and "TIFF" in skipped["train"][0]["reason"]
    warned = [line for line in capsys.readouterr().err.splitlines() if "cut.tif" in line]
    assert warned and all("not a readable TIFF" in line for line in warned)
    assert main(["-q", "embed", str(model), str(cells), "--out", str(tmp_path / "emb"), "--batch-size", "4"]) == 0
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert meta["count"] == 10 and [item["id"] for item in meta["skipped_unreadable"]] == ["b/cut.tif"]
    half = tiff_bytes(pixels((5, 36, 36), seed=12), ome=True, metadata={"axes": "CYX"})
    (cells / "a" / "half.ome.tif").write_bytes(half[: len(half) // 2])
    checked = check_images(load_labeled(cells), max_skip_rate=0.5, channels=5)
    reasons = {item["id"]: item["reason"] for item in checked.skipped}
    assert set(reasons) == {"b/cut.tif", "a/half.ome.tif"} and "the model takes 5" in reasons["a/half.ome.tif"]
    with pytest.raises(LabeledDataError, match=r"2 of 12 images are unreadable .*first: .*half\.ome\.tif: 1 channels"):
        check_images(load_labeled(cells), channels=5)  # above the default data.max_skip_rate: one line, no skip


@pytest.mark.fault(injected="5-channel labeled shards given to an RGB backbone (random:resvit_nano) for k-NN",
                   did="one line naming the shard sample, its channel count and that the backbone takes RGB",
                   lost="nothing")
def test_an_rgb_backbone_given_n_channel_images_stops_with_one_line_naming_the_sample(cell_shards):
    from ssl_hybrid.data.labeled import LabeledDataError, load_labeled
    from ssl_hybrid.eval.features import features_for_spec

    with pytest.raises(LabeledDataError, match=r"sample '.+': a uint16 image of 5 channels; this backbone takes RGB"):
        features_for_spec("random:resvit_nano", [load_labeled(cell_shards)], image_size=32, batch_size=4)


@pytest.mark.slow
def test_five_channel_pretrain_knn_finetune_predict_end_to_end(tmp_path, capsys):
    """The whole path a microscopist takes, on a tiny demo set: make-demo -> shards --channels 5 -> pretrain
    (joint MIM + DINO, hybrid_nano, 2 steps) -> knn / finetune / predict on the TIFF files themselves."""
    from ssl_hybrid.cli import main

    cells, shards, runs = tmp_path / "cells", tmp_path / "shards", tmp_path / "runs"
    assert main(["make-demo", "microscopy", "--out", str(cells), "--per-class", "4", "--test-per-class", "2",
                 "--size", "32"]) == 0
    assert main(["shards", "--src", str(cells / "train"), "--out", str(shards), "--channels", "5",
                 "--channel-names", "nuclei,cytoplasm,membrane,speckles,marker"]) == 0
    overrides = [f"train.output_dir={runs}", "name=c5", f"data.train={shards}", "data.channels=5",
                 "data.image_size=32", "data.num_workers=0", "data.shuffle_buffer=4", "model.name=hybrid_nano",
                 "data.augment_on=device",  # the photometric half batched in the trainer, with the shards' statistics
                 "objective.dino_out_dim=32", "objective.decoder_dim=32", "objective.decoder_depth=1",
                 "objective.warmup_teacher_temp_steps=1", "train.steps=2", "train.batch_size=4",
                 "train.checkpoint_every=1", "train.knn_every=0"]
    assert main(["-q", "pretrain", *overrides]) == 0
    config = json.loads((runs / "c5" / "model" / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 5
    assert config["ssl_hybrid"]["normalization"]["names"][4] == "marker"
    model = str(runs / "c5" / "model")
    assert main(["-q", "knn", model, "--train", str(cells / "train"), "--test", str(cells / "test"), "--no-cache",
                 "--out", str(tmp_path / "knn.json")]) == 0
    assert 0.0 <= json.loads((tmp_path / "knn.json").read_text())["top1"] <= 1.0
    assert main(["-q", "finetune", model, "--train", str(shards), "--test", str(cells / "test"), "--epochs", "1",
                 "--batch-size", "4", "--save", str(tmp_path / "tuned")]) == 0
    tuned = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert tuned["pretrained_cfg"]["mean"] == config["pretrained_cfg"]["mean"]
    capsys.readouterr()
    image = next((cells / "test" / "nuclear").glob("*.tif"))
    assert main(["-q", "predict", str(tmp_path / "tuned"), str(image)]) == 0
    assert image.name in capsys.readouterr().out


def test_five_channel_stream_resumes_exactly(cell_shards, tiny_cfg):
    """The N-channel views draw from the per-sample seeded RNG like lightly's: a resumed stream gives the same
    batches, bit for bit, as one that never stopped."""
    import torch

    from ssl_hybrid.data.views import build_transform

    cfg = tiny_cfg(cell_shards, channels=5, resampled=True, shuffle_buffer=3)
    transform = build_transform(cfg, ch.stream_normalization(cfg))

    def fresh():
        return build_train_stream(cfg, 2, seed=5, rank=0, world_size=1, transform=transform)

    def take(stream, count):
        iterator = iter(stream)
        return [next(iterator) for _ in range(count)]

    straight = take(fresh(), 5)
    first = fresh()
    head = take(first, 2)
    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(head + take(resumed, 3), straight):
        assert a["key"] == b["key"]
        assert all(torch.equal(x, y) for x, y in zip(a["global_views"], b["global_views"]))
    assert not torch.equal(straight[0]["global_views"][0], straight[0]["global_views"][1])
