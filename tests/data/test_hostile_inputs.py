"""Hostile inputs, as users' corpora contain them: every image mode and EXIF orientation decodes to the RGB
a viewer shows, decompression bombs are refused at PIL's default limit, tar members named ``../x`` or
``/abs`` are skipped and counted (never used as a path), randomly corrupted shards are skipped and
counted without hanging or crashing, and labeled folders with an empty or a one-image class load.
Each path users take is checked: the training stream, a labeled folder (evaluation) and the shard writer."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from data_helpers import TinyViews, jpeg_bytes, write_manifest, write_tar

from ssl_hybrid.data import shards as shard_format
from ssl_hybrid.data.labeled import LabeledDataError, kshot_indices, load_labeled
from ssl_hybrid.data.stream import DataQualityError, build_train_stream, decode_image_or_reason, read_shard

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encoded(image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def quadrants(top_left=RED, top_right=GREEN, bottom_left=BLUE, bottom_right=WHITE, size: int = 16):
    """A 2size x 2size RGB image of four flat quadrants (flat, so JPEG keeps their centres)."""
    from PIL import Image

    rows = [np.concatenate([np.full((size, size, 3), a, np.uint8), np.full((size, size, 3), b, np.uint8)], 1)
            for a, b in ((top_left, top_right), (bottom_left, bottom_right))]
    return Image.fromarray(np.concatenate(rows, 0))


def centres(image) -> list[tuple[int, ...]]:
    """The colour at the centre of each quadrant: top-left, top-right, bottom-left, bottom-right."""
    pixels = np.asarray(image)
    h, w = pixels.shape[0] // 4, pixels.shape[1] // 4
    return [tuple(int(v) for v in pixels[y, x]) for y, x in ((h, w), (h, 3 * w), (3 * h, w), (3 * h, 3 * w))]


def with_exif_orientation(image, orientation: int, fmt: str) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation
    return encoded(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def mode_cases() -> dict[str, tuple[bytes, str, list[tuple[int, ...]], int]]:
    """name -> (file bytes, extension, expected quadrant centres, tolerance per channel)."""
    from PIL import Image

    rgb = quadrants()
    gray = [(76,) * 3, (150,) * 3, (29,) * 3, WHITE]  # ITU-R 601 luma of red, green, blue, white
    levels = np.array([[0x1234, 0x8000], [0xFF00, 0xFFFF]], np.uint16)
    deep = Image.fromarray(np.kron(levels, np.ones((16, 16), np.uint16)))  # 16-bit grayscale quadrants
    rgba = np.array(rgb.convert("RGBA"))
    rgba[:16, :16, 3] = 0  # transparent top-left (its hidden colour is red)
    rgba[:16, 16:, 3] = 128  # half-transparent green
    palette = Image.fromarray(rgba).quantize(4)  # palette with a transparent index
    gray_alpha = np.array(rgb.convert("LA"))
    gray_alpha[16:, :16, 1] = 0  # transparent bottom-left
    return {
        "cmyk.jpg": (encoded(rgb.convert("CMYK"), "JPEG", quality=95), "jpg", [RED, GREEN, BLUE, WHITE], 12),
        "grayscale.jpg": (encoded(rgb.convert("L"), "JPEG", quality=95), "jpg", gray, 4),
        "grayscale.png": (encoded(rgb.convert("L"), "PNG"), "png", gray, 1),
        "gray16.png": (encoded(deep, "PNG"), "png", [(0x12,) * 3, (0x80,) * 3, (0xFF,) * 3, (0xFF,) * 3], 0),
        "palette.png": (encoded(rgb.quantize(4), "PNG"), "png", [RED, GREEN, BLUE, WHITE], 0),
        "palette_alpha.png": (encoded(palette, "PNG"), "png", [WHITE, (127, 255, 127), BLUE, WHITE], 1),
        "rgba.png": (encoded(Image.fromarray(rgba), "PNG"), "png", [WHITE, (127, 255, 127), BLUE, WHITE], 1),
        "gray_alpha.png": (encoded(Image.fromarray(gray_alpha, "LA"), "PNG"), "png",
                           [gray[0], gray[1], WHITE, WHITE], 1),
        # EXIF orientation 6: shown rotated 90 degrees clockwise, so the stored top-left lands top-right
        "exif6.jpg": (with_exif_orientation(rgb, 6, "JPEG"), "jpg", [BLUE, RED, WHITE, GREEN], 12),
        "exif8.jpg": (with_exif_orientation(rgb, 8, "JPEG"), "jpg", [GREEN, WHITE, RED, BLUE], 12),
        "exif3.jpg": (with_exif_orientation(rgb, 3, "JPEG"), "jpg", [WHITE, BLUE, GREEN, RED], 12),
        "exif6.png": (with_exif_orientation(rgb, 6, "PNG"), "png", [BLUE, RED, WHITE, GREEN], 0),
    }


def assert_colours(image, expected, tolerance, where):
    assert image.mode == "RGB", where
    got = centres(image)
    assert all(abs(g - e) <= tolerance for gs, es in zip(got, expected) for g, e in zip(gs, es)), \
        f"{where}: quadrant centres {got}, expected {expected} (±{tolerance})"


@pytest.mark.fault(injected="CMYK, 16-bit, palette+alpha, RGBA, grayscale and EXIF-rotated JPEG/PNG images",
                   did="decoded to the RGB a viewer shows (orientation applied, alpha over white) by the "
                       "stream, labeled folders and the shard writer", lost="nothing")
@pytest.mark.parametrize("name", list(mode_cases()))
def test_image_modes_and_exif_orientation_decode_to_the_rgb_a_viewer_shows(name, tmp_path):
    data, extension, expected, tolerance = mode_cases()[name]
    image, reason = decode_image_or_reason({"__key__": "k", extension: data})
    assert reason is None
    assert_colours(image, expected, tolerance, "stream")
    folder = tmp_path / "labeled" / "cls"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    assert_colours(load_labeled(tmp_path / "labeled").load_image(0), expected, tolerance, "labeled folder")
    # Re-encoding shards bakes the orientation in (the EXIF tag does not survive a JPEG re-encode).
    manifest = shard_format.write_shards(tmp_path / "labeled", tmp_path / "shards", max_side=64, quality=95,
                                         progress=False)
    assert manifest["num_samples"] == 1 and manifest["skipped"] == []
    sample = next(read_shard(str(tmp_path / "shards" / manifest["shards"][0]["name"])))
    assert_colours(decode_image_or_reason(sample)[0], expected, tolerance + 8, "re-encoded shard")


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a few dozen bytes that would decode to GBs)."""
    from PIL import Image

    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the IHDR chunk's CRC
    return bytes(data)


@pytest.mark.fault(injected="decompression-bomb PNGs (header claims 10000x10000 and 30000x30000 pixels)",
                   did="refused before decoding at PIL's default MAX_IMAGE_PIXELS: skipped and counted by the "
                       "stream, listed in the writer's manifest, one-line error naming the file in evaluation",
                   lost="nothing but the bombs")
def test_decompression_bombs_are_refused_at_pils_default_limit(tmp_path, image_folder):
    from PIL import Image

    assert shard_format.MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's default, not a test value
    for side in (10_000, 30_000):  # above PIL's warning limit, and above its error limit (2x)
        reason = decode_image_or_reason({"__key__": "bomb", "png": bomb_png(side, side)})[1]
        assert reason.startswith("decompression bomb refused"), reason
        (image_folder / "alpha" / f"bomb{side}.png").write_bytes(bomb_png(side, side))
    manifest = shard_format.write_shards(image_folder, tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 18
    assert {s["path"]: s["reason"][:26] for s in manifest["skipped"]} == dict.fromkeys(
        ["alpha/bomb10000.png", "alpha/bomb30000.png"], "decompression bomb refused")
    labeled = load_labeled(image_folder)
    index = labeled.ids.index("alpha/bomb30000.png")
    with pytest.raises(LabeledDataError, match=r"alpha/bomb30000\.png: decompression bomb refused"):
        labeled.load_image(index)


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import tarfile

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.fault(injected="a shard with tar members named ../x.jpg, a/../../y.jpg and /tmp/.../z.jpg",
                   did="those samples skipped and counted (stream) or skipped with a warning (labeled sets); "
                       "no file is ever written from a tar member", lost="nothing but those samples")
def test_tar_members_with_unsafe_names_are_skipped_and_never_written(tmp_path, tiny_cfg, tiny_views, caplog):
    shard_dir = tmp_path / "deep" / "shards"
    shard_dir.mkdir(parents=True)
    absolute = str(tmp_path / "escaped_abs.jpg")
    members = [("good0.jpg", jpeg_bytes(0)), ("good0.cls", b"0"), ("../escaped.jpg", jpeg_bytes(1)),
               ("../escaped.cls", b"0"), ("a/../../escaped2.jpg", jpeg_bytes(2)), (absolute, jpeg_bytes(3)),
               ("good1.jpg", jpeg_bytes(4)), ("good1.cls", b"1")]
    write_raw_tar(shard_dir / "evil-000000.tar", members)
    write_manifest(shard_dir, {"evil-000000.tar": 6}, classes=["a", "b"])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    stream = build_train_stream(tiny_cfg(shard_dir, max_skip_rate=1.0), 1, 0, 0, 1, tiny_views, epochs=1)
    keys = [key for batch in stream for key in batch["key"]]
    assert sorted(keys) == ["good0", "good1"]
    assert stream.stats()["seen"] == 6 and stream.stats()["skipped"] == 4  # 2 members of ../escaped + 2 more
    assert "unsafe tar member name '../escaped.jpg'" in caplog.text and "(absolute path)" in caplog.text
    labeled = load_labeled(shard_dir)
    assert labeled.ids == ["good0", "good1"] and labeled.load_image(1).size == (24, 20)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path(absolute).exists()


def corrupted(data: bytes, seed: int) -> bytes:
    """1-8 random bytes replaced, or (every fourth seed) a random cut: what bit rot and partial copies do."""
    rng = np.random.default_rng(seed)
    if seed % 4 == 3:
        return data[:int(rng.integers(1, len(data)))]
    out = bytearray(data)
    for position in rng.integers(0, len(out), size=int(rng.integers(1, 9))):
        out[position] ^= int(rng.integers(1, 256))
    return bytes(out)


@pytest.mark.fault(injected="100 seeded corruptions of a shard (random bytes flipped, or cut short)",
                   did="the stream skips and counts what it cannot read (or stops with one line when nothing in "
                       "an epoch is usable); labeled sets raise one-line errors; never a hang or a crash",
                   lost="only the unreadable samples")
@pytest.mark.timeout(120)
def test_fuzzed_shards_are_skipped_and_counted_never_hang_or_crash(tmp_path, tiny_cfg, tiny_views):
    samples = [{"__key__": f"s{i}", "jpg": jpeg_bytes(i, size=(16, 12)), "cls": str(i % 2).encode()} for i in range(6)]
    pristine = write_tar(tmp_path / "pristine.tar", samples).read_bytes()
    outcomes = {"all read": 0, "skips counted": 0, "stopped: nothing usable": 0}
    for seed in range(100):
        directory = tmp_path / f"fuzz{seed}"
        directory.mkdir()
        (directory / "f-000000.tar").write_bytes(corrupted(pristine, seed))
        write_manifest(directory, {"f-000000.tar": 6})
        stream = build_train_stream(tiny_cfg(directory, max_skip_rate=1.0, shuffle_buffer=3), 2, seed, 0, 1,
                                    tiny_views, epochs=1)
        try:
            delivered = sum(len(batch["key"]) for batch in stream)
        except DataQualityError as err:
            assert "no usable sample" in str(err) and "\n" not in str(err)
            outcomes["stopped: nothing usable"] += 1
            continue
        stats = stream.stats()
        assert stats["seen"] >= 6 and delivered == stats["seen"] - stats["skipped"], (seed, stats, delivered)
        outcomes["all read" if stats["skipped"] == 0 else "skips counted"] += 1
        try:
            labeled = load_labeled(directory)
        except LabeledDataError as err:
            assert "\n" not in str(err)
            continue
        for index in range(len(labeled)):
            try:
                labeled.load_image(index)
            except LabeledDataError as err:
                assert "\n" not in str(err)
    assert min(outcomes.values()) > 0, outcomes  # the corruptions exercised every outcome


@pytest.mark.fault(injected="a labeled folder with an empty class folder and a class of one image",
                   did="the empty class is left out with a warning naming it; the one-image class loads and "
                       "k-shot beyond 1 stops with one line naming the class and the largest usable k",
                   lost="nothing")
def test_labeled_folder_with_an_empty_class_and_a_one_image_class(image_folder, caplog):
    (image_folder / "delta_empty").mkdir()
    for path in sorted((image_folder / "gamma").iterdir())[1:]:
        path.unlink()
    labeled = load_labeled(image_folder)
    assert labeled.classes == ["alpha", "beta", "gamma"] and np.bincount(labeled.labels).tolist() == [6, 6, 1]
    assert "class folder 'delta_empty' holds no images: left out" in caplog.text
    assert len(kshot_indices(labeled.labels, 1, seed=0)) == 3
    with pytest.raises(LabeledDataError, match=r"^class 2 has 1 training samples, fewer than 2 shots; the smallest "
                                               r"class has 1: use at most 1 shots or add images$"):
        kshot_indices(labeled.labels, 2, seed=0)


# ------------------------------------------------------------------------------------- model files


class _Marker:
    """Unpickling this writes a file: proof that a pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def evil_pickle(tmp_path: Path) -> tuple[Path, Path]:
    """(a .pth whose unpickling creates a marker file, that marker's path)."""
    import pickle

    marker = tmp_path / "pickle_ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Marker(str(marker))}))
    return path, marker


def model_folder_variants(directory: Path, changes: dict[str, dict]) -> dict[str, Path]:
    """One hybrid_nano (32 px) model folder per entry, its config.json with that entry's keys merged in."""
    import json
    import shutil

    from ssl_hybrid.models.export import CONFIG_NAME, MODEL_WEIGHTS_NAME, save_model_folder
    from ssl_hybrid.models.factory import create_backbone

    original = save_model_folder(create_backbone("hybrid_nano", 32), directory / "original", extra={"image_size": 32})
    config = json.loads((original / CONFIG_NAME).read_text())
    made = {}
    for index, (what, change) in enumerate(changes.items()):
        made[what] = directory / f"model{index}"
        made[what].mkdir()
        shutil.copy(original / MODEL_WEIGHTS_NAME, made[what] / MODEL_WEIGHTS_NAME)
        changed = {k: dict(config[k], **v) if isinstance(v, dict) else v for k, v in change.items()}
        (made[what] / CONFIG_NAME).write_text(json.dumps(dict(config, **changed)))
    return made


@pytest.mark.fault(injected="a model folder's config.json (or an old backbone.json) whose model_args hold "
                            "checkpoint_path (a code-running pickle), pretrained_cfg_overlay, cache_dir or an "
                            "unknown argument, or whose architecture names a source (local-dir:, hf-hub:, timm/)",
                   did="refused with one line naming the file and the argument before timm is called: a file "
                       "may only set the model class's own constructor arguments",
                   lost="nothing (no pickle is read)")
def test_model_files_may_only_set_the_model_classes_own_arguments(tmp_path):
    import json
    import shutil

    from ssl_hybrid.errors import UserError
    from ssl_hybrid.eval.backbones import load_backbone_spec
    from ssl_hybrid.models.export import load_backbone

    pickle_path, marker = evil_pickle(tmp_path)
    hostile = {"checkpoint_path": {"model_args": {"checkpoint_path": str(pickle_path)}},
               "pretrained_cfg_overlay": {"model_args": {"pretrained_cfg_overlay": {"file": str(pickle_path)}}},
               "cache_dir": {"model_args": {"cache_dir": str(tmp_path)}},
               "not_an_argument": {"model_args": {"not_an_argument": 1}},
               "local-dir:": {"architecture": f"local-dir:{tmp_path}"},
               "hf-hub:": {"architecture": "hf-hub:timm/resnet18.a1_in1k"},
               "timm/": {"architecture": "timm/resnet18"}}
    folders = model_folder_variants(tmp_path, dict(hostile, fine={"model_args": {"depth": 4}}))
    for what in hostile:
        for load in (load_backbone, load_backbone_spec):
            with pytest.raises(UserError) as caught:
                load(str(folders[what]))
            message = str(caught.value)
            assert str(folders[what] / "config.json") in message and what in message and "\n" not in message
    # The export before model folders (backbone.safetensors + backbone.json) is read through the same check.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folders["fine"] / "model.safetensors", legacy / "backbone.safetensors")
    (legacy / "backbone.json").write_text(json.dumps({"model_name": "hybrid_nano", "image_size": 32,
                                                      "factory_kwargs": {"checkpoint_path": str(pickle_path)}}))
    with pytest.raises(UserError, match=rf"^{legacy}/backbone\.json: factory argument checkpoint_path not accepted"):
        load_backbone(str(legacy))
    assert not marker.exists()
    # The arguments our factories record load as before.
    model, meta = load_backbone_spec(str(folders["fine"]))
    assert meta["model"] == "hybrid_nano" and meta["image_size"] == 32


@pytest.mark.fault(injected="a checkpoint's config.yaml whose model.arch holds checkpoint_path (a pickle), or a "
                            "run's config.yaml naming local-dir:<folder>, read by `export` and the evaluators",
                   did="refused with one line naming the config.yaml and the argument or name",
                   lost="nothing (the checkpoint is untouched, no pickle is read)")
def test_checkpoint_configs_may_only_set_the_model_classes_own_arguments(tmp_path):
    import yaml
    from safetensors.torch import save_file

    from ssl_hybrid.config import load_config, to_yaml
    from ssl_hybrid.errors import UserError
    from ssl_hybrid.eval.backbones import load_backbone_spec
    from ssl_hybrid.train.export import export_checkpoint

    pickle_path, marker = evil_pickle(tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    save_file({"backbone.x": __import__("torch").zeros(1)}, str(step / "model.safetensors"))
    (step / "state.pt").write_bytes(b"")  # never read: the config is refused first
    config = load_config(overrides=["model.name=hybrid_nano", "data.image_size=32"])
    config.model.arch = {"checkpoint_path": str(pickle_path)}
    (step / "config.yaml").write_text(to_yaml(config))
    before = sorted(p.name for p in step.iterdir())
    with pytest.raises(UserError, match=r"config\.yaml: factory argument checkpoint_path not accepted"):
        export_checkpoint(step)
    assert sorted(p.name for p in step.iterdir()) == before and not marker.exists()
    run_config = yaml.safe_load(to_yaml(config))
    run_config["model"]["name"] = f"local-dir:{tmp_path}"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_config))
    with pytest.raises(UserError, match=r"run/config\.yaml: model name 'local-dir:"):
        load_backbone_spec(str(tmp_path / "run"))


def test_timm_loads_checkpoints_with_weights_only():
    """The pinned timm (>= 1.0.26) reads any checkpoint it is pointed at without running pickled code."""
    import inspect

    from timm.models import load_checkpoint, load_state_dict

    for function in (load_checkpoint, load_state_dict):
        assert inspect.signature(function).parameters["weights_only"].default is True
    pins = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"timm>=1.0.26"' in pins


# ------------------------------------------------------------------------------------- shard lists


def labeled_shard(path: Path, count: int = 2) -> Path:
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(i), "cls": str(i % 2).encode()} for i in range(count)]
    return write_tar(path, samples)


@pytest.mark.fault(injected="a shard list file (.txt) with a line 'pipe:touch <marker>; cat shard.tar'",
                   did="refused with one line naming the list and the line, before anything runs; runs only "
                       "with data.allow_pipe_in_lists=true; pipe: typed in data.train runs as before",
                   lost="nothing (no command runs)")
def test_a_pipe_line_in_a_shard_list_runs_only_when_allowed(tmp_path, tiny_cfg, tiny_views):
    from ssl_hybrid.errors import UserError

    shard = labeled_shard(tmp_path / "a-000000.tar")
    marker = tmp_path / "pipe_ran"
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# from elsewhere\n\npipe:touch {marker}; cat {shard}\n")
    for load in (lambda: build_train_stream(tiny_cfg(listing), 1, 0, 0, 1, tiny_views, epochs=1),
                 lambda: load_labeled(listing)):
        with pytest.raises(UserError, match=rf"^{listing} line 3: a 'pipe:' shard runs a shell command.*"
                                            r"data\.allow_pipe_in_lists=true"):
            load()
    assert not marker.exists()
    allowed = build_train_stream(tiny_cfg(listing, allow_pipe_in_lists=True), 1, 0, 0, 1, tiny_views, epochs=1)
    assert sorted(key for batch in allowed for key in batch["key"]) == ["k0", "k1"] and marker.exists()
    typed = build_train_stream(tiny_cfg(f"pipe:cat {shard}"), 1, 0, 0, 1, tiny_views, epochs=1)
    assert sorted(key for batch in typed for key in batch["key"]) == ["k0", "k1"]


@pytest.mark.fault(injected="manifest.json listing shards named ../outside.tar, /abs/path.tar and pipe:<command>",
                   did="refused with one line naming the manifest and the name, by the stream and labeled sets "
                       "alike: a manifest lists files in its own folder",
                   lost="nothing (no file outside the folder is read, no command runs)")
def test_manifest_shard_names_outside_its_folder_are_refused(tmp_path, tiny_cfg, tiny_views):
    from ssl_hybrid.errors import UserError

    directory = tmp_path / "set"
    directory.mkdir()
    outside = labeled_shard(tmp_path / "outside.tar")
    marker = tmp_path / "pipe_ran"
    for name in ("../outside.tar", str(outside), f"pipe:touch {marker}; cat {outside}"):
        write_manifest(directory, {name: 2}, classes=["a", "b"])
        for load in (lambda: build_train_stream(tiny_cfg(directory), 1, 0, 0, 1, tiny_views, epochs=1),
                     lambda: load_labeled(directory)):
            with pytest.raises(UserError) as caught:
                load()
            assert str(directory / "manifest.json") in str(caught.value) and repr(name) in str(caught.value)
    assert not marker.exists()


@pytest.mark.fault(injected="manifest.json without its format line, with bare shard names, or a shard without an "
                            "integer 'samples' count",
                   did="refused with one line naming the manifest, by the stream and labeled sets alike (one "
                       "resolver; before, the stream crashed on bare names and labeled sets read all three)",
                   lost="nothing")
def test_malformed_manifests_are_refused_alike_by_stream_and_labeled_sets(tmp_path, tiny_cfg, tiny_views):
    from ssl_hybrid.errors import UserError

    directory = tmp_path / "set"
    directory.mkdir()
    labeled_shard(directory / "a-000000.tar")
    good = {"format": "ssl_hybrid-shards/1", "shards": [{"name": "a-000000.tar", "samples": 2}], "classes": ["a", "b"]}
    malformed = [{key: value for key, value in good.items() if key != "format"},
                 dict(good, shards=["a-000000.tar"]),
                 dict(good, shards=[{"name": "a-000000.tar", "samples": "two"}])]
    for manifest in malformed:
        (directory / "manifest.json").write_text(json.dumps(manifest))
        for load in (lambda: build_train_stream(tiny_cfg(directory), 1, 0, 0, 1, tiny_views, epochs=1),
                     lambda: load_labeled(directory)):
            with pytest.raises(UserError, match=rf"^{directory / 'manifest.json'}: ") as caught:
                load()
            assert "\n" not in str(caught.value)
    (directory / "manifest.json").write_text(json.dumps(good))
    assert load_labeled(directory).ids == ["k0", "k1"]


# ------------------------------------------------------------------------------------- image decoders and sizes

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.fault(injected="a PostScript/EPS file named .jpg (PIL hands EPS to Ghostscript)",
                   did="decoded only by the formats of the supported extensions: skipped and counted as not a "
                       "readable image (stream, labeled sets, shard writer); Ghostscript never runs",
                   lost="nothing but that file")
def test_postscript_never_reaches_ghostscript(tmp_path, monkeypatch, image_folder):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    reason = decode_image_or_reason({"__key__": "k", "jpg": EPS})[1]
    assert reason.startswith("not a readable image (UnidentifiedImageError")
    (image_folder / "alpha" / "drawing.jpg").write_bytes(EPS)
    labeled = load_labeled(image_folder)
    assert labeled.decode(labeled.ids.index("alpha/drawing.jpg"))[0] is None
    manifest = shard_format.write_shards(image_folder, tmp_path / "out", progress=False, workers=1)
    assert [s["path"] for s in manifest["skipped"]] == ["alpha/drawing.jpg"]
    assert calls == []


def bounded_resizes(monkeypatch, limit: int) -> list[tuple[int, int]]:
    """Record every PIL resize; one asking for more than ``limit`` pixels fails before it allocates."""
    from PIL import Image

    sizes, resize = [], Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        if size[0] * size[1] > limit:
            raise MemoryError(f"resize to {size[0]}x{size[1]} px")
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return sizes


@pytest.mark.fault(injected="a 1 x 60000 px PNG strip (a few hundred bytes) in an evaluation set",
                   did="the evaluation resize bounds its longer side (16x the shorter): the strip becomes a padded "
                       "96 px crop from a 1 x 1760 px resize instead of a 110 x 6.6M px (2 GB) one",
                   lost="nothing")
def test_an_extreme_aspect_ratio_cannot_make_the_evaluation_resize_allocate_gigabytes(tmp_path, monkeypatch):
    from PIL import Image

    from ssl_hybrid.data.labeled import TorchLabeledDataset
    from ssl_hybrid.eval.features import eval_transform

    folder = tmp_path / "labeled" / "a"
    folder.mkdir(parents=True)
    (folder / "strip.png").write_bytes(encoded(Image.new("RGB", (60_000, 1), RED), "PNG"))
    (folder / "tall.png").write_bytes(encoded(Image.new("RGB", (1, 60_000), RED), "PNG"))
    (folder / "square.png").write_bytes(encoded(quadrants(), "PNG"))
    sizes = bounded_resizes(monkeypatch, limit=110 * 110 * 16)
    dataset = TorchLabeledDataset(load_labeled(tmp_path / "labeled"), eval_transform(96))
    pixels = [dataset[index][0] for index in range(len(dataset))]
    assert all(tensor.shape == (3, 96, 96) for tensor in pixels)
    assert max(w * h for w, h in sizes) <= 110 * 110 * 16 and (110, 110) in sizes  # the square one as before


class StripRefusingViews:
    """TinyViews that fail on an image 50 times wider than tall, as an augmentation pipeline may."""

    def __call__(self, image) -> dict:
        if image.width > 50 * image.height:
            raise ValueError(f"cannot crop a {image.width}x{image.height} image")
        return TinyViews()(image)


@pytest.mark.fault(injected="a transform that raises on one image of a shard (an extreme aspect ratio)",
                   did="that sample is skipped, counted and logged with its url and key like a corrupt image; "
                       "the other samples train",
                   lost="only that sample")
def test_a_transform_failure_is_a_counted_skip(tmp_path, tiny_cfg, caplog):
    from PIL import Image

    directory = tmp_path / "shards"
    directory.mkdir()
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(i)} for i in range(3)]
    samples.insert(1, {"__key__": "strip", "png": encoded(Image.new("RGB", (2000, 1)), "PNG")})
    write_tar(directory / "s-000000.tar", samples)
    write_manifest(directory, {"s-000000.tar": 4})
    stream = build_train_stream(tiny_cfg(directory, max_skip_rate=0.5), 1, 0, 0, 1, StripRefusingViews(), epochs=1)
    assert sorted(key for batch in stream for key in batch["key"]) == ["k0", "k1", "k2"]
    assert stream.stats()["seen"] == 4 and stream.stats()["skipped"] == 1
    assert "key strip: cannot be transformed (ValueError: cannot crop a 2000x1 image)" in caplog.text


# ------------------------------------------------------------------------------------- sidecars, labels, sizes

DEEP_JSON = b"[" * 200_000 + b"]" * 200_000  # 400 KB: deeper than json's decoder recurses


@pytest.mark.fault(injected="a labeled shard whose sample's .json sidecar is nested 200,000 levels deep, and a "
                            "manifest.json / backbone.json nested as deep",
                   did="the sample is kept with a warning (its class_name ignored); the nested manifest or "
                       "backbone.json is refused with one line naming it",
                   lost="nothing")
def test_deeply_nested_json_is_a_warning_or_one_line(tmp_path, tiny_cfg, tiny_views, caplog):
    from ssl_hybrid.errors import UserError
    from ssl_hybrid.eval.backbones import load_backbone_spec

    directory = tmp_path / "set"
    directory.mkdir()
    write_tar(directory / "s-000000.tar", [{"__key__": "deep", "jpg": jpeg_bytes(0), "cls": b"1", "json": DEEP_JSON},
                                           {"__key__": "fine", "jpg": jpeg_bytes(1), "cls": b"0",
                                            "json": b'{"class_name": "cat"}'}])
    (directory / "manifest.json").write_text(
        '{"format": "ssl_hybrid-shards/1", "shards": [{"name": "s-000000.tar", "samples": 2}]}')
    labeled = load_labeled(directory)
    assert labeled.ids == ["deep", "fine"] and labeled.classes == ["cat", "1"]
    assert "sample 'deep': its 'json' is not valid JSON" in caplog.text
    (directory / "manifest.json").write_bytes(DEEP_JSON)
    for load in (lambda: load_labeled(directory),
                 lambda: build_train_stream(tiny_cfg(directory), 1, 0, 0, 1, tiny_views, epochs=1)):
        with pytest.raises(UserError, match=r"manifest\.json: unreadable manifest \(RecursionError"):
            load()
    (tmp_path / "backbone.json").write_bytes(DEEP_JSON)
    (tmp_path / "backbone.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"backbone\.json: JSON nested too deeply"):
        load_backbone_spec(str(tmp_path))


@pytest.mark.fault(injected="cls fields of -3, 10^30 and 10^12 (a labeled set without class names would list "
                            "10^12 classes)",
                   did="the stream skips and counts those samples ('malformed cls field (label ... outside "
                       "0..99999)'); labeled sets skip them with a warning",
                   lost="only those samples")
def test_labels_out_of_range_or_absurdly_large_are_skipped(tmp_path, tiny_cfg, tiny_views, caplog):
    directory = tmp_path / "set"
    directory.mkdir()
    labels = {"neg": b"-3", "huge": str(10**30).encode(), "wide": str(10**12).encode(), "ok0": b"0", "ok1": b"1"}
    write_tar(directory / "s-000000.tar", [{"__key__": key, "jpg": jpeg_bytes(i), "cls": cls}
                                           for i, (key, cls) in enumerate(labels.items())])
    write_manifest(directory, {"s-000000.tar": 5})  # no class names: the labels size the class list
    stream = build_train_stream(tiny_cfg(directory, max_skip_rate=1.0), 1, 0, 0, 1, tiny_views, epochs=1)
    batches = list(stream)
    assert sorted(key for batch in batches for key in batch["key"]) == ["ok0", "ok1"]
    assert sorted(int(batch["label"][0]) for batch in batches) == [0, 1]
    assert stream.stats()["skipped"] == 3 and "key huge: malformed cls field (label 10000" in caplog.text
    labeled = load_labeled(directory)
    assert labeled.ids == ["ok0", "ok1"] and labeled.classes == ["0", "1"]
    assert "sample 'wide' skipped ('cls' is not a class index: label 1000000000000 outside 0..99999)" in caplog.text


@pytest.mark.fault(injected="tar members larger than the tool reads: a 2 MiB .json sidecar (limit 1 MiB), and an "
                            "image member over the member limit (lowered for the test)",
                   did="left unread; their samples skipped and counted by the stream, skipped with a warning by "
                       "labeled sets", lost="only those samples")
def test_oversized_tar_members_are_skipped_unread(tmp_path, tiny_cfg, tiny_views, monkeypatch, caplog):
    directory = tmp_path / "set"
    directory.mkdir()
    big_json = b'{"pad": "' + b"x" * (2 << 20) + b'"}'
    write_tar(directory / "s-000000.tar", [
        {"__key__": "ok0", "jpg": jpeg_bytes(0), "cls": b"0"},
        {"__key__": "bigjson", "jpg": jpeg_bytes(1), "cls": b"1", "json": big_json},
        {"__key__": "bigimage", "png": encoded(quadrants(size=64), "PNG", compress_level=0), "cls": b"1"},
        {"__key__": "ok1", "jpg": jpeg_bytes(2), "cls": b"1"}])
    write_manifest(directory, {"s-000000.tar": 4}, classes=["a", "b"])

    def read(expected_keys: list[str]) -> None:
        stream = build_train_stream(tiny_cfg(directory, max_skip_rate=1.0), 1, 0, 0, 1, tiny_views, epochs=1)
        assert sorted(key for batch in stream for key in batch["key"]) == expected_keys
        assert stream.stats()["seen"] == 4 and stream.stats()["skipped"] == 4 - len(expected_keys)
        assert load_labeled(directory).ids == [key for key in ("ok0", "bigimage", "ok1") if key in expected_keys]

    read(["bigimage", "ok0", "ok1"])
    assert "key bigjson: tar member 'bigjson.json' has 2097163 bytes, over the 1048576-byte limit" in caplog.text
    monkeypatch.setattr(shard_format, "MAX_MEMBER_BYTES", 20_000)  # the PNG is ~49 KB, the JPEGs ~1.5 KB
    read(["ok0", "ok1"])
    assert "key bigimage: tar member 'bigimage.png' has" in caplog.text


# ------------------------------------------------------------------------------------- secrets


@pytest.mark.fault(injected="${oc.env:SSL_HYBRID_TEST_SECRET} in a recipe, a command-line override and a saved "
                            "config.yaml (the variable holding a secret)",
                   did="refused with one line naming the source and the key before anything is resolved or "
                       "written; a pipe: command that reads $VAR in its shell is kept literally",
                   lost="nothing (the secret is in no saved config or log)")
def test_environment_variables_are_never_resolved_into_configs(tmp_path, monkeypatch):
    from ssl_hybrid.config import ConfigError, from_dict, load_config, to_dict, write_config

    monkeypatch.setenv("SSL_HYBRID_TEST_SECRET", "s3cr3t-value")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  train: https://host/s-{000000..000003}.tar?token=${oc.env:SSL_HYBRID_TEST_SECRET}\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: key 'data\.train': \$\{{oc\.env:\.\.\.}} is not resolved"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"^command line \(train\.output_dir=.*key 'train\.output_dir'"):
        load_config(overrides=["train.output_dir=/runs/${oc.env:SSL_HYBRID_TEST_SECRET}"])
    saved = dict(to_dict(load_config()), name="${oc.env:SSL_HYBRID_TEST_SECRET}")
    with pytest.raises(ConfigError, match=r"^run/config\.yaml: key 'name'"):
        from_dict(saved, "run/config.yaml")
    typed = load_config(overrides=["data.train=pipe:curl -s https://host/a.tar?token=$SSL_HYBRID_TEST_SECRET"])
    written = write_config(typed, tmp_path / "run").read_text()
    assert "token=$SSL_HYBRID_TEST_SECRET" in written and "s3cr3t" not in written


@pytest.mark.fault(injected="shard URLs with credentials (https://user:pass@host/..., ?X-Amz-Signature=, Azure "
                            "sig=, a Bearer token in a pipe: curl)",
                   did="replaced by *** in TensorBoard hparams, in every log line and in the CLI's one-line "
                       "errors; the config itself is used as typed",
                   lost="nothing")
def test_credentials_in_shard_urls_are_not_written_to_hparams_or_logs(tmp_path, capsys):
    import logging

    from ssl_hybrid.cli import main
    from ssl_hybrid.config import load_config
    from ssl_hybrid.logs import setup_logging
    from ssl_hybrid.train.wiring import flat_hparams

    secrets = ("pa55w0rd", "SIGabc123", "AKIAEXAMPLE", "c2FzLXNpZw", "eyJtoken.x")
    train = ("https://alice:pa55w0rd@store.example/s-{000000..000009}.tar"
             "?X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=SIGabc123&part=1")
    val = "https://acct.blob.core.windows.net/c/val?sv=2024&sig=c2FzLXNpZw"
    config = load_config(overrides=[f"data.train={train}", f"data.val={val}"])
    hparams = flat_hparams(config)
    assert hparams["data.train"] == "https://***@store.example/s-{000000..000009}.tar" \
                                   "?X-Amz-Credential=***&X-Amz-Signature=***&part=1"
    assert not any(secret in str(value) for value in hparams.values() for secret in secrets)
    stream = io.StringIO()
    setup_logging(0, stream)
    try:
        logging.getLogger("ssl_hybrid.data.stream").warning("shard %s unreadable", train)
        logging.getLogger("webdataset").error("curl failed: pipe:curl -H 'Authorization: Bearer eyJtoken.x' %s", val)
    finally:
        logging.getLogger().handlers.clear()
    assert "store.example/s-{000000..000009}.tar" in stream.getvalue()
    assert not any(secret in stream.getvalue() for secret in secrets)
    try:
        assert main(["shards", "--src", train, "--out", str(tmp_path / "out")]) == 2
    finally:
        logging.getLogger().handlers.clear()
    error = capsys.readouterr().err
    assert "source not found" in error and not any(secret in error for secret in secrets)
