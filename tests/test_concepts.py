"""Tests for diffusion.concepts (letters, styles, judges) and the K-class ``train_classifier``.

Small counts and a few training steps only: the whole file runs in well under a minute on two CPU cores.
"""

import numpy as np
import pytest
from scipy import ndimage

from diffusion import classifier, concepts, data


@pytest.fixture(scope="module")
def test_digits():
    images, labels = data.load_embedded_mnist("test")
    picks = np.random.default_rng(0).choice(len(images), 200, replace=False)
    return images[picks], labels[picks]


@pytest.fixture(scope="module")
def letters():
    return concepts.render_letters("AKXo", 24, seed=7)


# ---------------------------------------------------------------------------
# Letters
# ---------------------------------------------------------------------------


def test_render_letters_shapes_dtypes_and_index(letters):
    images, index = letters
    assert images.shape == (4 * 24, 28, 28) and images.dtype == np.uint8
    assert index.shape == (4 * 24,) and np.issubdtype(index.dtype, np.integer)
    np.testing.assert_array_equal(index, np.repeat(np.arange(4), 24))
    assert images.max() > 200  # white ink ...
    assert np.median(images) == 0  # ... on black


def test_render_letters_is_deterministic_per_seed_and_differs_across_seeds(letters):
    again, _ = concepts.render_letters("AKXo", 24, seed=7)
    np.testing.assert_array_equal(again, letters[0])
    other, _ = concepts.render_letters("AKXo", 24, seed=8)
    assert np.mean(other != letters[0]) > 0.05


def test_each_letter_depends_only_on_seed_and_letter_and_a_few_shot_set_is_a_prefix(letters):
    images, index = letters
    alone, _ = concepts.render_letters("X", 24, seed=7)
    np.testing.assert_array_equal(alone, images[index == 2])
    few, _ = concepts.render_letters("X", 5, seed=7)
    np.testing.assert_array_equal(few, alone[:5])


def test_each_letter_looks_different_from_the_others(letters):
    images, index = letters
    images = images.astype(np.float64)
    # The mean image of one half of a letter's images is nearer its other half than any other letter's mean.
    first = np.stack([images[index == i][:12].mean(axis=0) for i in range(4)])
    second = np.stack([images[index == i][12:].mean(axis=0) for i in range(4)])
    distances = np.abs(first[:, None] - second[None, :]).mean(axis=(2, 3))
    np.testing.assert_array_equal(distances.argmin(axis=1), np.arange(4))
    assert np.all(np.diag(distances) * 1.5 < np.min(distances + np.eye(4) * 1e9, axis=1))


def test_letters_are_normalised_like_mnist_digits(letters, test_digits):
    images = letters[0].astype(np.float64)
    centres = concepts._centres_of_mass(images)
    # The centre of mass on pixel (14, 14), as MNIST's; the jitter moves it by at most ~2 px.
    np.testing.assert_allclose(centres.mean(axis=0), [14.0, 14.0], atol=0.5)
    assert np.abs(centres - 14.0).max() < 2.5
    digit_centres = concepts._centres_of_mass(test_digits[0].astype(np.float64))
    np.testing.assert_allclose(digit_centres.mean(axis=0), [14.0, 14.0], atol=0.2)
    # Ink within the frame: almost none on its outermost pixels; the character about 20 px tall or wide.
    border = np.ones((28, 28), bool)
    border[1:-1, 1:-1] = False
    assert images[:, border].sum() < 0.01 * images.sum()
    ink = images >= 128
    rows, cols = ink.any(axis=2).sum(axis=1), ink.any(axis=1).sum(axis=1)
    assert 16 <= np.median(np.maximum(rows, cols)) <= 23
    # About as much ink as a digit (MNIST's mean intensity is 0.13).
    assert 0.6 < images.mean() / test_digits[0].mean() < 1.5


@pytest.mark.parametrize(
    "bad", ["", "A1", "AKA", "A K", "é", "Ä", None, 5, ["A", "K"]], ids=lambda bad: repr(bad)
)
def test_bad_letters_are_refused_with_a_value_error(bad):
    with pytest.raises(ValueError, match="letter"):
        concepts.render_letters(bad, 2, seed=0)


@pytest.mark.parametrize("count, seed", [(0, 0), (2.0, 0), (True, 0), (2, -1), (2, 1.5)])
def test_bad_count_or_seed_is_refused(count, seed):
    with pytest.raises(ValueError, match="count|seed"):
        concepts.render_letters("A", count, seed)


# ---------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------


def test_unknown_style_or_bad_images_are_refused(test_digits):
    with pytest.raises(ValueError, match="valid styles: hollow, italic"):
        concepts.stylize(test_digits[0], "bold")
    with pytest.raises(ValueError, match="uint8"):
        concepts.stylize(test_digits[0].astype(np.float32), "hollow")
    with pytest.raises(ValueError, match="uint8"):
        concepts.hollowness(test_digits[0][0])


@pytest.mark.parametrize("style", list(concepts.STYLES))
def test_styles_are_fixed_transforms_applied_image_by_image(style, test_digits):
    images = test_digits[0]
    styled = concepts.stylize(images, style)
    assert styled.shape == images.shape and styled.dtype == np.uint8
    np.testing.assert_array_equal(concepts.stylize(images, style), styled)
    np.testing.assert_array_equal(concepts.stylize(images[5:9], style), styled[5:9])
    assert np.mean(np.abs(styled.astype(int) - images)) > 10  # really changed


def test_hollow_raises_hollowness_far_above_plain_digits(test_digits):
    plain = concepts.hollowness(test_digits[0])
    hollow = concepts.hollowness(concepts.stylize(test_digits[0], "hollow"))
    assert plain.shape == hollow.shape == (200,)
    assert np.all((0 <= plain) & (plain <= 1)) and np.all((0 <= hollow) & (hollow <= 1))
    assert hollow.mean() > plain.mean() + 0.3
    assert np.mean(hollow > plain) > 0.95
    # Thresholding halfway between the means tells the two apart almost always.
    cut = (hollow.mean() + plain.mean()) / 2
    assert np.mean(plain < cut) > 0.9 and np.mean(hollow > cut) > 0.9


def test_hollow_keeps_the_digit_where_it_was(test_digits):
    images = test_digits[0]
    hollow = concepts.hollow(images)
    # The outline stays on the stroke: every wall pixel is within 2 px of the original ink.
    near = ndimage.binary_dilation(images >= 64, structure=np.ones((1, 5, 5), bool))
    assert np.all(near[hollow >= 64])


def test_italic_shears_by_the_fixed_amount_and_stays_centred(test_digits):
    images = test_digits[0]
    italic = concepts.stylize(images, "italic")
    lean = concepts.slant(italic) - concepts.slant(images)
    np.testing.assert_allclose(lean.mean(), concepts.ITALIC_SHEAR, atol=0.03)
    assert np.all(lean > concepts.ITALIC_SHEAR / 2)
    before = concepts._centres_of_mass(images.astype(np.float64))
    after = concepts._centres_of_mass(italic.astype(np.float64))
    assert np.abs(after - before).max() < 0.5
    np.testing.assert_allclose(italic.sum(axis=(1, 2)), images.sum(axis=(1, 2)), rtol=0.1)


def test_shears_add_up_and_a_shift_moves_whole_pixels(test_digits):
    images = test_digits[0][:50]
    np.testing.assert_array_equal(concepts.shear(images, 0.0), images)  # no shear: no resampling at all
    twice = concepts.shear(concepts.shear(images, 0.15), 0.2).astype(int)
    once = concepts.shear(images, 0.35).astype(int)
    assert np.abs(twice - once).mean() < 5  # the same picture, bar the rounding of one extra interpolation
    moved = concepts.shear(images, 0.0, shift=(1, -2))
    np.testing.assert_array_equal(moved[:, 1:, :-2], images[:, :-1, 2:])
    per_image = concepts.shear(images[:2], [0.0, 0.35])
    np.testing.assert_array_equal(per_image, np.stack([images[0], concepts.italic(images[1:2])[0]]))


def test_slant_sees_a_sheared_bar():
    # A vertical bar leans right by 0.5 columns per row once its top is moved right.
    bar = np.zeros((2, 28, 28), np.uint8)
    for row in range(4, 24):
        bar[0, row, 13:15] = 255
        col = 14 + round(0.5 * (14 - row))
        bar[1, row, col - 1 : col + 1] = 255
    np.testing.assert_allclose(concepts.slant(bar), [0.0, 0.5], atol=0.02)


# ---------------------------------------------------------------------------
# train_classifier with K classes, and the judges
# ---------------------------------------------------------------------------


def toy_problem(num_classes, per_class, seed):
    """Class k: a bright 5 x 5 square at the k-th of 4 x 3 well-separated places, on faint noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        row, col = 3 + 8 * (k // 4), 1 + 7 * (k % 4)
        images[i, row : row + 5, col : col + 5] = 255
    return images, labels


def test_train_classifier_fits_more_than_ten_classes():
    images, labels = toy_problem(12, 40, seed=0)
    model = classifier.train_classifier(images, labels, steps=40, batch_size=64, num_classes=12)
    test_images, test_labels = toy_problem(12, 10, seed=1)
    logits, _ = classifier.logits_and_features(model, data.to_model_range(test_images))
    assert logits.shape == (120, 12)
    assert np.mean(logits.argmax(axis=1) == test_labels) > 0.5  # chance is 1/12
    # concept_accuracy is the same count, per image or for one class at a time.
    assert concepts.concept_accuracy(model, test_images, test_labels) == np.mean(logits.argmax(axis=1) == test_labels)
    eleven = test_labels == 11
    assert concepts.concept_accuracy(model, test_images[eleven], 11) == np.mean(logits[eleven].argmax(axis=1) == 11)
    with pytest.raises(ValueError, match="one per image"):
        concepts.concept_accuracy(model, test_images, test_labels[:5])


def test_train_classifier_still_makes_ten_classes_by_default_and_checks_labels():
    images, labels = toy_problem(10, 8, seed=0)
    model = classifier.train_classifier(images, labels, steps=1, batch_size=16)
    assert model.head.out_features == 10
    with pytest.raises(ValueError, match=r"0\.\.9"):
        classifier.train_classifier(images, labels + 1, steps=1, batch_size=16)
    with pytest.raises(ValueError, match="num_classes"):
        classifier.train_classifier(images, labels, steps=1, batch_size=16, num_classes=1)
    with pytest.raises(ValueError, match="integer"):
        classifier.train_classifier(images, labels.astype(np.float32), steps=1, batch_size=16)


def test_letter_judge_has_a_class_per_letter_and_validates():
    judge = concepts.letter_judge("AK", images_per_letter=500, steps=40)
    assert judge.head.out_features == 12
    scores = concepts.validate_letter_judge(judge, "AK", images_per_letter=20)
    assert set(scores) == {"digits", "letters", "A", "K"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert scores["letters"] == pytest.approx((scores["A"] + scores["K"]) / 2)
    assert scores["digits"] > 0.5 and scores["letters"] > 0.5  # 40 steps: rough, but far above chance (1/12)
    with pytest.raises(ValueError, match="12 classes"):
        concepts.validate_letter_judge(judge, "AKX")


def test_style_judge_has_twenty_classes_and_validates():
    judge = concepts.style_judge("hollow", steps=25)
    assert judge.head.out_features == 20
    scores = concepts.validate_style_judge(judge, "hollow")
    assert set(scores) == {"plain", "styled", "style", "plain softened"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert scores["style"] > 0.8  # hollow or not is the easy half of the question, learned in a few steps
    with pytest.raises(ValueError, match="valid styles"):
        concepts.style_judge("bold", steps=1)
