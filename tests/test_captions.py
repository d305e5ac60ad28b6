"""Captions from measured attributes: each measurement on synthetic strokes of known width, slant and size;
the bins, the grammar and the held-out combinations."""

import numpy as np
import pytest

from diffusion import captions
from diffusion.tokenizer import caption_tokenizer

SUPERSAMPLE = 8  # sub-pixels per pixel side when drawing anti-aliased shapes


def draw(inside, size=28):
    """A uint8 image of the shape ``inside(x, y) -> bool`` (pixel coordinates, y down), anti-aliased by
    averaging SUPERSAMPLE² points per pixel."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    coords = (np.arange(size)[:, None] + offsets[None, :]).ravel()
    y, x = np.meshgrid(coords, coords, indexing="ij")
    ink = inside(x, y).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return np.round(255 * ink).astype(np.uint8)[None]


def ring(radius, width, centre=14.0):
    return draw(lambda x, y: np.abs(np.hypot(x - centre, y - centre) - radius) < width / 2)


def bar(length, width, angle_degrees, centre=14.0):
    """A rectangle of ``length`` by ``width`` pixels through the centre, turned ``angle_degrees`` from vertical."""
    a = np.radians(angle_degrees)
    along = lambda x, y: (x - centre) * np.sin(a) - (y - centre) * np.cos(a)
    across = lambda x, y: (x - centre) * np.cos(a) + (y - centre) * np.sin(a)
    return draw(lambda x, y: (np.abs(along(x, y)) < length / 2) & (np.abs(across(x, y)) < width / 2))


@pytest.mark.parametrize("width", [2.0, 2.5, 3.0, 4.0, 5.0])
def test_thickness_of_a_ring_is_its_width(width):
    """A ring has no ends: ink 2 pi r w, perimeter 4 pi r, so 2 ink / perimeter is w exactly."""
    assert captions.thickness(ring(8.0, width))[0] == pytest.approx(width, rel=0.02)


def test_thickness_still_orders_strokes_thinner_than_the_stencil():
    """Below 2 pixels the estimate reads high (the gradient stencil spans two pixels) but keeps the order."""
    measured = [captions.thickness(ring(8.0, width))[0] for width in (1.0, 1.25, 1.5, 1.75, 2.0)]
    assert np.all(np.diff(measured) > 0.05) and measured[0] < 1.6


@pytest.mark.parametrize("angle", [0, 20, 45, 70, 90])
def test_thickness_of_a_bar_is_the_same_at_every_angle(angle):
    """A w x L rectangle: 2 w L / (2 w + 2 L), whatever its direction (the total variation is isotropic)."""
    width, length = 3.0, 18.0
    expected = width * length / (width + length)
    assert captions.thickness(bar(length, width, angle))[0] == pytest.approx(expected, rel=0.04)


@pytest.mark.parametrize("shear", [-0.4, -0.1, 0.0, 0.2, 0.5])
def test_slant_of_a_sheared_bar_is_its_shear(shear):
    """x = 14 + shear * (14 - y) + u, |u| < 1.5, |y - 14| < 9: the bar moves ``shear`` pixels right per pixel up."""
    image = draw(lambda x, y: (np.abs(x - 14 - shear * (14 - y)) < 1.5) & (np.abs(y - 14) < 9))
    assert captions.slant(image)[0] == pytest.approx(shear, abs=0.01)


def test_slant_turns_with_the_image():
    image = bar(18, 3, 15)  # leaning right: its top is to the right of its bottom
    assert captions.slant(image)[0] > 0.2 and captions.slant(image[:, :, ::-1])[0] < -0.2


def test_size_is_the_area_of_the_inked_box():
    image = np.zeros((2, 28, 28), np.uint8)
    image[0, 4:24, 10:19] = 255  # 20 x 9
    image[0, 3, 10] = 100  # less than half inked: outside the box
    assert list(captions.size(image)) == [180.0, 0.0]
    assert captions.size(image[..., None])[0] == 180.0  # (N, H, W, 1) as well


def test_bins_cut_at_the_terciles_per_class_only_for_size():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 300)
    measured = {name: rng.normal(size=600) + 5 * labels for name in captions.MEASURES}
    thresholds = captions.attribute_thresholds(measured, labels, num_classes=2)
    bins = captions.attribute_bins(measured, labels, thresholds)
    for name in captions.MEASURES:
        for c in (0, 1):
            counts = np.bincount(bins[name][labels == c], minlength=3)
            if name in captions.PER_CLASS:  # a third of each class in each bin
                assert list(counts) == [100, 100, 100]
            else:  # cut over all digits: class 0 lies low (no digit in the top bin), class 1 high
                assert counts[2 - 2 * c] == 0 and counts[2 * c] == 200
    assert set(captions.PER_CLASS) == {"size"}


def test_captions_name_the_digit_and_only_true_attributes():
    rng = np.random.default_rng(1)
    bins = {"thickness": "bold", "slant": "right", "size": "medium"}
    seen = {captions.caption(rng, 7, bins) for _ in range(400)}
    true_words = {"bold", "thick", "leaning", "slanted", "right"}
    for text in seen:
        words = text.split()
        assert ("seven" in words) != ("7" in words)
        assert set(words) - {"a", "an", "seven", "7"} <= true_words, text
    assert {"seven", "7", "a 7", "a bold seven leaning right", "a seven slanted right"} <= seen
    assert all(text.index("bold") < text.index("seven") for text in seen if "bold" in text and "seven" in text)
    assert len(seen) > 20  # drawn afresh: many phrasings of one digit


def test_articles_fit_the_next_word():
    rng = np.random.default_rng(2)
    for digit, bins in [(8, {}), (1, {}), (3, {"slant": "upright"})]:
        for _ in range(100):
            words = captions.caption(rng, digit, bins).split()
            if words[0] in ("a", "an"):
                assert words[0] == ("an" if words[1] in ("eight", "8", "upright") else "a"), words


def test_held_out_combinations_are_never_named_together():
    rng = np.random.default_rng(3)
    combination = captions.HELD_OUT[0]  # four, bold, leaning left
    bins = {"size": "large", **combination.attributes}
    texts = [captions.caption(rng, combination.digit, bins) for _ in range(2000)]
    assert not any("bold" in t or "thick" in t for t in texts if "left" in t)
    assert any("left" in t for t in texts) and any("bold" in t or "thick" in t for t in texts)
    free = [captions.caption(rng, combination.digit, bins, held_out=False) for _ in range(2000)]
    assert any(("bold" in t or "thick" in t) and "left" in t for t in free)


def test_a_caption_reads_back_as_what_it_names():
    words = caption_tokenizer().words
    rng = np.random.default_rng(4)
    for _ in range(300):
        digit = int(rng.integers(10))
        named = {a: list(p)[rng.integers(len(p))] for a, p in captions.PHRASES.items() if rng.random() < 0.6}
        assert captions.prompt_meaning(words(captions.phrase(rng, digit, named))) == (digit, named)
    assert captions.prompt_meaning(words("a bold 7, leaning right")) == (7, {"thickness": "bold", "slant": "right"})
    assert captions.prompt_meaning([]) == (None, {})


def test_evaluation_prompts_avoid_the_held_out_combinations_unless_asked():
    rng = np.random.default_rng(5)
    seen = captions.evaluation_prompts(rng, 500)
    held = captions.evaluation_prompts(rng, 6, held_out=True)
    words = caption_tokenizer().words
    meanings = [captions.prompt_meaning(words(p)) for p in seen]
    assert all(1 <= len(asked) <= 3 for _, asked in meanings)
    assert not any(captions._is_held_out(d, asked) for d, asked in meanings)
    assert [captions.prompt_meaning(words(p)) for p in held] == [tuple(c) for c in captions.HELD_OUT] * 2


def test_signed_margin_is_the_distance_inside_the_bin():
    cuts = {"slant": np.array([[0.0, 0.3], [0.1, 0.2]])}
    values, digits = np.array([0.1, -0.2, 0.5, 0.15]), np.array([0, 0, 0, 1])
    for name, expected in [("upright", [0.1, -0.2, -0.2, 0.05]), ("left", [-0.1, 0.2, -0.5, -0.05]),
                           ("right", [-0.2, -0.5, 0.2, -0.05])]:
        np.testing.assert_allclose(captions.signed_margin(values, digits, "slant", name, cuts), expected)


def test_attribute_report_scores_real_digits_by_their_own_bins_and_against_the_others():
    """Asked for the bins they are in, real digits score 100 % with margins >= 0; asked for another bin, 0 %."""
    from diffusion import data, evaluation

    images, labels = data.load_dataset("mnist-embedded", "train")
    cuts = captions.attribute_thresholds(captions.measure(images), labels)
    bins = captions.attribute_bins(captions.measure(images[:300]), labels[:300], cuts)
    own = [{a: captions.BINS[a][bins[a][i]] for a in ("thickness", "slant")} for i in range(300)]
    other = [{a: captions.BINS[a][(bins[a][i] + 1) % 3] for a in ("thickness", "slant")} for i in range(300)]
    right = evaluation.attribute_report(images[:300], labels[:300], own, cuts)
    wrong = evaluation.attribute_report(images[:300], labels[:300], other, cuts)
    assert set(right) == {"thickness", "slant"} and right["slant"]["count"] == 300
    assert all(r["accuracy"] == 1.0 and r["margin"] >= 0 for r in right.values())
    assert all(r["accuracy"] == 0.0 and r["margin"] < 0 for r in wrong.values())
