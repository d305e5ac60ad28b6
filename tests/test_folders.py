"""Your own images: folders of grey and colour pictures (written here), their cache, bad folders, and colour from
training through sampling, editing and the PNG round trip."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion import configs, data, folders, generate, pictures, runs, training
from diffusion.errors import ConfigError, DataError

from conftest import ctrl_c_at, leaves_equal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("shared_compilation_cache")

COLOURS = {"blue": (30, 40, 220), "green": (20, 200, 40), "red": (220, 30, 30)}


def picture(colour, height, width, fmt, path):
    """A (height, width) picture of one colour with a white centre square, saved as ``fmt``."""
    pixels = np.zeros((height, width, 3), np.uint8) + np.array(colour, np.uint8)
    pixels[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def classes_folder(root, per_class=4, classes=("blue", "green", "red")):
    """A folder with one sub-folder of pictures per colour, of mixed sizes and formats (PNG, JPEG, WebP)."""
    rng = np.random.default_rng(0)
    for name in classes:
        for i in range(per_class):
            height, width = rng.integers(12, 40, 2)
            fmt, suffix = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
            picture(COLOURS[name], height, width, fmt, root / name / f"{i}.{suffix}")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- Listing and preparing -------------------------------------------------------------------


def test_class_folders_become_sorted_labels(tmp_path):
    root = classes_folder(tmp_path / "pics")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    picture(COLOURS["red"], 9, 9, "PNG", root / ".hidden" / "x.png")  # hidden: not looked at
    listing = folders.scan(root)
    assert listing.class_names == ("blue", "green", "red")
    assert len(listing.files) == 12 and listing.other_files == ("red/notes.txt",)
    assert [listing.labels[i] for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4  # files sorted, so grouped


@pytest.mark.parametrize("channels", [1, 3])
def test_pictures_are_resized_and_centre_cropped(tmp_path, channels):
    path = tmp_path / "wide.png"
    picture(COLOURS["red"], 30, 60, "PNG", path)  # 60 wide: the centre 30 x 30 is kept, then halved
    out = folders.prepare(path, 15, channels)
    assert out.shape == ((15, 15) if channels == 1 else (15, 15, 3)) and out.dtype == np.uint8
    # Of the 60-pixel width, columns 15..44 are kept: the white square (columns 20..39) sits in the middle,
    # 5 kept pixels from each side, so 2.5 after halving; in rows it spans the middle third.
    white = out if channels == 1 else out[..., 2]  # white: 255; red: blue 30, grey 87
    assert white[7, 7] > 240 and white[7, 0] < 120 and white[7, 14] < 120 and white[0, 7] < 120
    if channels == 3:
        np.testing.assert_allclose(out[0, 0], COLOURS["red"], atol=3)


def test_load_caches_once_and_rebuilds_when_the_folder_changes(tmp_path, monkeypatch):
    root = classes_folder(tmp_path / "pics")
    (root / "green" / "broken.jpg").write_bytes(b"not a jpeg")
    calls = []
    real_prepare = folders.prepare
    monkeypatch.setattr(folders, "prepare", lambda *a: calls.append(a[0]) or real_prepare(*a))

    first = folders.load(root, 8, 3, tmp_path / "cache")
    assert first.images.shape == (12, 8, 8, 3) and first.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(first.unreadable) == 1 and first.unreadable[0].startswith("green/broken.jpg (")
    assert len(calls) == 13
    again = folders.load(root, 8, 3, tmp_path / "cache")  # from the cache: nothing decoded
    assert len(calls) == 13 and again.cache == first.cache and again.unreadable == first.unreadable
    np.testing.assert_array_equal(again.images, first.images)
    assert folders.load(root, 8, 1, tmp_path / "cache").images.shape == (12, 8, 8)  # grey: another cache file

    picture(COLOURS["red"], 20, 20, "PNG", root / "red" / "new.png")  # a file added
    grown = folders.load(root, 8, 3, tmp_path / "cache")
    assert len(grown.images) == 13 and grown.fingerprint != first.fingerprint and not first.cache.exists()
    os.utime(root / "blue" / "0.png", ns=(0, 0))  # a file touched: its time is part of the fingerprint
    assert folders.load(root, 8, 3, tmp_path / "cache").fingerprint != grown.fingerprint
    assert len(list((tmp_path / "cache" / "folders").glob("*.npz"))) == 2  # stale ones removed: RGB and grey
    assert not list((tmp_path / "cache" / "folders").glob(".*"))  # no temporary files left


def test_a_folder_changing_while_it_is_read_is_refused(tmp_path, monkeypatch):
    root = classes_folder(tmp_path / "pics")
    real_prepare = folders.prepare

    def prepare_and_add(path, *args):
        picture(COLOURS["red"], 9, 9, "PNG", root / "red" / "late.png")
        return real_prepare(path, *args)

    monkeypatch.setattr(folders, "prepare", prepare_and_add)
    with pytest.raises(DataError, match="changed while it was being read"):
        folders.load(root, 8, 3, tmp_path / "cache")
    assert not (tmp_path / "cache" / "folders").exists() or not any((tmp_path / "cache" / "folders").iterdir())


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no images in"),
        ({"readme.txt": b"hello"}, "it holds 1 other file"),
        ({"cats/a.png": "image"}, "single class folder, cats"),
        ({"a.png": "image", "cats/b.png": "image", "dogs/c.png": "image"}, "directly in it"),
        ({"a.png": b"garbage", "b.jpg": b"garbage"}, "none of the 2 images"),
    ],
)
def test_bad_folders_get_one_clear_message(tmp_path, layout, message):
    root = tmp_path / "pics"
    root.mkdir()
    for name, content in layout.items():
        if content == "image":
            picture(COLOURS["blue"], 10, 10, "PNG", root / name)
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        folders.load(root, 8, 3, tmp_path / "cache")


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        folders.scan(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a folder"):
        folders.scan(tmp_path / "file.png")


# --- Runs on a folder -----------------------------------------------------------------------


def test_start_config_pins_the_folder(tmp_path, cache):
    root = classes_folder(tmp_path / "pics")
    config = runs.start_config("tiny", dataset=f"folder:{root}", runs_dir=str(tmp_path / "runs"))
    assert config.dataset == f"folder:{root.resolve()}" and config.class_names == ("blue", "green", "red")
    assert config.num_classes == 3 and (config.image_size, config.in_channels) == (32, 3)
    assert config.dataset_sha256 == folders.scan(root).fingerprint and config.label_names[2] == "red"
    assert runs.start_config("tiny", dataset=f"folder:{root}", num_classes=0).num_classes == 0
    with pytest.raises(ConfigError, match="num_classes must be that, or 0"):
        runs.start_config("tiny", dataset=f"folder:{root}", num_classes=5)
    with pytest.raises(ConfigError, match="grey .* or RGB"):
        runs.start_config("tiny", dataset=f"folder:{root}", in_channels=2)
    with pytest.raises(ConfigError, match="needs it pinned"):
        configs.make_config("tiny", dataset=f"folder:{root}")
    with pytest.raises(ConfigError, match="crop random needs a folder"):
        configs.make_config("tiny", crop="random")
    # A named dataset's size and channels come with it.
    cifar = runs.start_config("tiny", dataset="cifar10", attention_resolutions=(16,))
    assert (cifar.image_size, cifar.in_channels, cifar.label_names[3]) == (32, 3, "cat")


def tiny_folder_config(root, runs_dir, name, **overrides):
    return runs.start_config(
        "tiny", dataset=f"folder:{root}", image_size=8, attention_resolutions=(4,), runs_dir=str(runs_dir),
        name=name, steps=6, checkpoint_every=3, sample_every=6, log_every=3, batch_size=4, **overrides,
    )


def test_training_on_a_folder_with_random_crops_and_flips_resumes_exactly(tmp_path, cache, capsys):
    root = classes_folder(tmp_path / "pics")
    (root / "red" / "broken.png").write_bytes(b"not a png")
    settings = dict(crop="random", flip=True)
    whole = training.train(tiny_folder_config(root, tmp_path / "runs", "whole", **settings))
    printed = capsys.readouterr().out
    assert "12 images, 3 classes (blue, green, red)" in printed and "red/broken.png" in printed
    stopped = tiny_folder_config(root, tmp_path / "runs", "stopped", **settings)
    training.train(stopped, callback=ctrl_c_at(3))
    resumed = training.train(runs.resume_config(str(tmp_path / "runs"), "stopped"))
    assert int(resumed.step) == 6 and leaves_equal(resumed.params, whole.params)
    grid = np.asarray(Image.open(runs.samples_path(tmp_path / "runs" / "whole", 6)))
    assert grid.ndim == 3 and grid.shape[2] == 3  # a colour grid, one row per class

    cached = sorted((cache / "folders").iterdir())
    picture(COLOURS["red"], 20, 20, "PNG", root / "red" / "new.png")
    with pytest.raises(DataError, match="has changed since this run started"):
        training.train(runs.resume_config(str(tmp_path / "runs"), "whole", steps=9))
    assert sorted((cache / "folders").iterdir()) == cached  # refused before decoding anything


# --- Colour downstream ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A tiny 8 x 8 RGB run on a three-class folder, with random weights (as tests/test_sample_cli.py's)."""
    from test_sample_cli import random_run

    root = classes_folder(tmp_path_factory.mktemp("pics") / "pics")
    config = runs.start_config("tiny", dataset=f"folder:{root}", image_size=8, attention_resolutions=(4,))
    pinned = {k: getattr(config, k) for k in ("dataset", "class_names", "dataset_sha256", "num_classes",
                                               "image_size", "in_channels", "attention_resolutions")}
    return random_run(tmp_path_factory.mktemp("runs"), "colour", **pinned)


def test_sample_by_class_name_writes_a_colour_png_that_redraws_bit_for_bit(colour_run, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["--checkpoint", str(colour_run), "--label", "red,blue", "--negative-label", "green", "--seed", "0-1",
            "--steps", "2", "--out", str(out)]
    assert sample.main(argv) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 10 - 2, 2 * 10 - 2, 3)  # two rows (seeds) by two columns (labels) of 8 x 8 RGB
    settings = generate.read_settings(out)
    assert settings.labels == (2, 0) and settings.negative_label == 1
    assert sample.main(argv[:-2] + ["--trajectory", "--out", str(tmp_path / "t.png")]) == 0
    strip = np.asarray(Image.open(tmp_path / "t_trajectory.png"))
    assert strip.ndim == 3 and strip.shape[2] == 3 and Image.open(tmp_path / "t.gif").n_frames == 3  # colour frames
    again = tmp_path / "again.png"
    assert sample.main(["--from-png", str(out), "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), grid)
    assert sample.main(argv[:2] + ["--label", "purple", "--out", str(tmp_path)]) == 2


def test_img2img_and_inpainting_take_colour_images(colour_run, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture(COLOURS["green"], 8, 8, "PNG", init)
    Image.fromarray(np.where(np.arange(8)[None, :] < 4, 0, 255).astype(np.uint8).repeat(8, 0)).save(mask)
    for extra in (["--strength", "0.5"], ["--mask", str(mask)]):
        out = tmp_path / f"{extra[0][2:]}.png"
        argv = ["--checkpoint", str(colour_run), "--init-image", str(init), "--label", "green", "--steps", "2",
                "--out", str(out), *extra]
        assert sample.main(argv) == 0
        images = pictures.load_images(out, 8, 3)
        assert images.shape[-1] == 3
        if extra[0] == "--mask":  # the kept half (black in the mask) is the init image's, to 8-bit rounding
            kept = data.scale_pixels(np.asarray(Image.open(init)))[:, :4]
            np.testing.assert_allclose(images[0][:, :4], kept, atol=1 / 127.5 + 1e-6)
    Image.open(init).convert("L").save(tmp_path / "grey.png")
    assert sample.main(["--checkpoint", str(colour_run), "--init-image", str(tmp_path / "grey.png"),
                        "--strength", "0.5", "--out", str(tmp_path)]) == 2  # a grey picture for a colour model


def test_evaluate_judges_colour_images_by_their_pixels(colour_run, cache, capsys):
    import evaluate  # noqa: E402 (beside sample.py, at the top of the repository)

    assert evaluate.main(["--checkpoint", str(colour_run), "--n", "6", "--steps", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["n"] == 6 and row["swd"] > row["floor"] > 0  # random weights: far from the real pictures
    assert evaluate.main(["--checkpoint", str(colour_run), "--n", "6", "--steps", "2"]) == 0
    assert "not Inception FID" in capsys.readouterr().out
