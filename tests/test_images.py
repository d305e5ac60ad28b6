"""Pictures: input images and masks checked and resized only when asked, grids, PNG text chunks."""

import numpy as np
import pytest
from PIL import Image

from diffusion import pictures
from diffusion.errors import GenerationError

def _save_png(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
    return path


def test_input_images_are_checked_and_resized_only_when_asked(tmp_path):
    digit = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    x = pictures.load_image(_save_png(tmp_path / "ok.png", digit), 28, 1)
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(np.round((x[..., 0] + 1) * 127.5), digit)  # pixels come back exactly

    big = _save_png(tmp_path / "big.png", np.zeros((56, 40), np.uint8))
    with pytest.raises(GenerationError, match=r"is 40×56 but the model makes 28×28 images: .*--resize"):
        pictures.load_image(big, 28, 1)
    assert pictures.load_image(big, 28, 1, resize=True).shape == (28, 28, 1)
    rgb = _save_png(tmp_path / "rgb.png", np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(GenerationError, match=r"has 3 channel\(s\) \(RGB\), but the model makes 1-channel images"):
        pictures.load_image(rgb, 28, 1)
    assert pictures.load_image(rgb, 28, 3).shape == (28, 28, 3)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(GenerationError, match="is not an image that can be read"):
        pictures.load_image(tmp_path / "text.png", 28, 1)
    with pytest.raises(GenerationError, match="does not exist"):
        pictures.load_image(tmp_path / "missing.png", 28, 1)


def test_mask_white_means_generate_black_means_keep(tmp_path):
    pixels = np.zeros((28, 28), np.uint8)
    pixels[:, 14:] = 255
    small = _save_png(tmp_path / "small.png", pixels[::2, ::2])
    pixels[0, 0], pixels[1, 0] = 127, 128  # thresholded at half: keep, generate
    mask = pictures.load_mask(_save_png(tmp_path / "mask.png", pixels), 28)
    assert mask.shape == (28, 28, 1) and mask.dtype == np.float32
    assert mask[0, 0] == 1 and mask[1, 0] == 0
    assert np.all(mask[2:, :14] == 1) and np.all(mask[:, 14:] == 0)
    with pytest.raises(GenerationError, match=r"mask .* is 14×14 but the model makes 28×28 images"):
        pictures.load_mask(small, 28)
    resized = pictures.load_mask(small, 28, resize=True)
    assert np.all(resized[:, :14] == 1) and np.all(resized[:, 14:] == 0)
