"""Captions for the digits, from what can be measured on them: stroke thickness, slant and size.

A text-conditioned model needs captions that mean something. The embedded
digits come with labels only, so this module measures three properties of
every digit with a few lines of NumPy each, bins them at the data's terciles,
and writes captions from a small grammar: "a bold seven leaning right",
"thin 3", "a small upright four".

Measurements (on grey images, ink = pixel / 255 in [0, 1]):

- ``thickness``: 2 · ink / total variation, in pixels. The total variation
  sum |grad u| of an image is the integral over levels of the perimeter of its
  level sets (the coarea formula), so for a stroke of width w and length L it
  is about the perimeter 2 (L + w), while the ink is w L: their ratio is the
  width w for a long stroke, whatever its shape or angle. The gradient is
  taken over 2×2 pixels, so it is exact to 2 % from 2 pixels wide, and reads
  thinner strokes high (1.5 pixels as 1.7) while keeping their order.
- ``slant``: -mu11 / mu02 from the second central moments of the ink (x to the
  right, y down): how many pixels the stroke moves right per pixel up, the
  shear that deskewing removes. Positive leans right, negative leans left.
- ``size``: the height times the width, in pixels, of the box around the
  pixels at least half inked. MNIST scales every digit so its longer side is
  about 20 pixels, so this is mostly the width of the digit.

Bins: each property is cut into three bins at its terciles over the training
digits (``attribute_thresholds``). Thickness and slant are cut over all the
digits, so "bold" and "leaning left" mean the same for every digit; size is
cut per class (``PER_CLASS``), since a one is narrower than any eight: "a
large one" is a wide one. Size names its outer two bins only (small / large).
On the embedded training digits the cuts are:
thickness 2.25 and 2.76 pixels, slant 0.01 and 0.25 (MNIST leans right: a
third of its digits lean right by more than 14 degrees).

Captions (``caption``): the digit as a word or a numeral, and each attribute
independently with probability ``MENTION_PROBABILITY``, in the phrasings of
``PHRASES``, the adjectives in random order; drawn afresh from a NumPy
generator each time a digit is seen. ``HELD_OUT`` lists combinations of a
digit with attributes that no training caption names together, so that a
model's compositional generalisation can be measured on them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# The bins of each attribute, from low to high values of its measurement.
BINS = {
    "thickness": ("thin", "regular", "bold"),
    "slant": ("left", "upright", "right"),
    "size": ("small", "medium", "large"),
}

# How a caption may say each bin: adjectives go before the digit, phrases of two words after it.
# A bin with no phrasing ("medium") is never named.
PHRASES = {
    "thickness": {"thin": ("thin", "light"), "regular": ("regular",), "bold": ("bold", "thick")},
    "slant": {
        "left": ("leaning left", "slanted left"),
        "upright": ("upright", "straight"),
        "right": ("leaning right", "slanted right"),
    },
    "size": {"small": ("small", "little"), "large": ("large", "big")},
}

PER_CLASS = ("size",)  # attributes cut at the terciles of each class; the others at those of all digits

MENTION_PROBABILITY = 0.5  # each attribute is named in a caption with this probability
NUMERAL_PROBABILITY = 0.3  # the digit is written "7" rather than "seven" with this probability
ARTICLE_PROBABILITY = 0.7  # a caption starts with "a" / "an" with this probability


class Combination(NamedTuple):
    """A digit with some attribute bins, e.g. ``Combination(4, {"thickness": "bold", "slant": "left"})``."""

    digit: int
    attributes: dict


# Prompts that show each attribute at both ends: the rows of a text run's sample grids, sample.py's default.
EXAMPLE_PROMPTS = (
    "a thin one", "a bold one", "a small two", "a large two", "a four leaning left", "a four leaning right",
    "a thin seven", "a bold seven", "an upright nine", "a nine leaning right",
)

# No training caption names all the parts of one of these (a caption may name some of them).
HELD_OUT = (
    Combination(4, {"thickness": "bold", "slant": "left"}),
    Combination(7, {"thickness": "thin", "slant": "right"}),
    Combination(2, {"size": "small", "slant": "upright"}),
)


# --- Measurements --------------------------------------------------------------------


def _ink(images) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, 1) as float64 ink in [0, 1], shape (N, H, W)."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    return images.astype(np.float64) / 255.0


def total_variation(images) -> np.ndarray:
    """sum over pixels of |grad u|, per image: the gradient from the four pixels around each corner of the grid."""
    u = np.pad(_ink(images), ((0, 0), (1, 1), (1, 1)))
    dx = 0.5 * (u[:, 1:, 1:] - u[:, 1:, :-1] + u[:, :-1, 1:] - u[:, :-1, :-1])
    dy = 0.5 * (u[:, 1:, 1:] - u[:, :-1, 1:] + u[:, 1:, :-1] - u[:, :-1, :-1])
    return np.sqrt(dx**2 + dy**2).sum(axis=(1, 2))


def thickness(images) -> np.ndarray:
    """Stroke width in pixels: 2 · ink / total variation (the coarea formula; see the module docstring)."""
    return 2.0 * _ink(images).sum(axis=(1, 2)) / np.maximum(total_variation(images), 1e-12)


def slant(images) -> np.ndarray:
    """Pixels right per pixel up, -mu11 / mu02 of the ink's second central moments (> 0: leaning right)."""
    u = _ink(images)
    _, H, W = u.shape
    y, x = np.mgrid[:H, :W].astype(np.float64)
    mass = np.maximum(u.sum(axis=(1, 2)), 1e-12)
    mean = lambda f: (u * f).sum(axis=(1, 2)) / mass
    x_bar, y_bar = mean(x), mean(y)
    dx, dy = x - x_bar[:, None, None], y - y_bar[:, None, None]
    mu11, mu02 = mean(dx * dy), mean(dy * dy)
    return -mu11 / np.maximum(mu02, 1e-12)


def size(images) -> np.ndarray:
    """Height × width of the box around the pixels at least half inked, in pixels (0 for a blank image)."""
    inked = _ink(images) >= 0.5
    rows, cols = inked.any(axis=2), inked.any(axis=1)

    def extent(mask):
        first = np.argmax(mask, axis=1)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        return np.where(mask.any(axis=1), last - first + 1, 0)

    return (extent(rows) * extent(cols)).astype(np.float64)


MEASURES = {"thickness": thickness, "slant": slant, "size": size}


def measure(images) -> dict[str, np.ndarray]:
    """Every attribute's measurement of every image: {"thickness": (N,), "slant": (N,), "size": (N,)}."""
    return {name: f(images) for name, f in MEASURES.items()}


# --- Bins ------------------------------------------------------------------------------


def attribute_thresholds(measured: dict, labels, num_classes: int = 10) -> dict[str, np.ndarray]:
    """The terciles of each measurement: {attribute: (num_classes, 2)}, the lower and upper cut for each class
    (the same row for every class unless the attribute is in ``PER_CLASS``)."""
    labels = np.asarray(labels)
    terciles = lambda values: np.quantile(values, [1 / 3, 2 / 3])
    return {
        name: np.stack([terciles(values[labels == c]) for c in range(num_classes)])
        if name in PER_CLASS
        else np.tile(terciles(values), (num_classes, 1))
        for name, values in measured.items()
    }


def attribute_bins(measured: dict, labels, thresholds: dict) -> dict[str, np.ndarray]:
    """Each digit's bin index (0, 1, 2: see ``BINS``) per attribute, cut at its class's ``thresholds``."""
    labels = np.asarray(labels)
    return {
        name: (values >= thresholds[name][labels, 0]).astype(np.int64) + (values >= thresholds[name][labels, 1])
        for name, values in measured.items()
    }


# --- Captions ------------------------------------------------------------------------------


def _is_held_out(digit: int, named: dict) -> bool:
    return any(
        digit == c.digit and all(named.get(k) == v for k, v in c.attributes.items()) for c in HELD_OUT
    )


def caption(rng: np.random.Generator, digit: int, bins: dict, held_out: bool = True) -> str:
    """A caption for one digit whose attribute bins are ``bins`` ({attribute: bin name}).

    Each attribute that has a phrasing for its bin is named with probability
    ``MENTION_PROBABILITY``; with ``held_out`` a caption that would name all the
    parts of a ``HELD_OUT`` combination drops one of its attributes.
    """
    named = {a: b for a, b in bins.items() if b in PHRASES[a] and rng.random() < MENTION_PROBABILITY}
    while held_out and _is_held_out(digit, named):
        del named[list(named)[rng.integers(len(named))]]
    return phrase(rng, digit, named)


def phrase(rng: np.random.Generator, digit: int, named: dict) -> str:
    """A caption of ``digit`` that names exactly the attribute bins ``named``, in a phrasing drawn from ``rng``."""
    before, after = [], []
    for attribute, bin_name in named.items():
        phrase = PHRASES[attribute][bin_name][rng.integers(len(PHRASES[attribute][bin_name]))]
        (after if " " in phrase else before).append(phrase)
    before = [before[i] for i in rng.permutation(len(before))]
    noun = str(digit) if rng.random() < NUMERAL_PROBABILITY else DIGIT_WORDS[digit]
    words = before + [noun] + after
    if rng.random() < ARTICLE_PROBABILITY:
        words.insert(0, "an" if words[0][0] in "eu8" else "a")  # an eight, an upright one, a one
    return " ".join(words)


def digit_table(images, labels, num_classes: int = 10) -> np.ndarray:
    """One row per digit, (N, 1 + len(BINS)) int64: its label, then its bin index for each attribute of ``BINS``,
    cut at the terciles of these digits (``attribute_thresholds``)."""
    measured = measure(images)
    bins = attribute_bins(measured, labels, attribute_thresholds(measured, labels, num_classes))
    return np.stack([np.asarray(labels, np.int64), *(bins[name] for name in BINS)], axis=1)


def captions_of(rng: np.random.Generator, rows) -> list[str]:
    """A fresh caption for each row of a ``digit_table``."""
    return [
        caption(rng, int(row[0]), {name: BINS[name][b] for name, b in zip(BINS, row[1:])})
        for row in np.asarray(rows)
    ]


def evaluation_prompts(rng: np.random.Generator, n: int, held_out: bool = False) -> list[str]:
    """n prompts to judge a text model with: each a digit and one to three attributes in bins drawn at random
    (never a ``HELD_OUT`` combination); with ``held_out``, the ``HELD_OUT`` combinations in turn instead."""
    prompts = []
    while len(prompts) < n:
        if held_out:
            combination = HELD_OUT[len(prompts) % len(HELD_OUT)]
            prompts.append(phrase(rng, combination.digit, combination.attributes))
            continue
        digit, count = int(rng.integers(10)), int(rng.integers(1, len(PHRASES) + 1))
        attributes = [list(PHRASES)[i] for i in rng.permutation(len(PHRASES))[:count]]
        named = {a: list(PHRASES[a])[rng.integers(len(PHRASES[a]))] for a in attributes}
        if not _is_held_out(digit, named):
            prompts.append(phrase(rng, digit, named))
    return prompts


# --- Reading a prompt back ----------------------------------------------------------------


def prompt_meaning(words) -> tuple[int | None, dict]:
    """What a prompt's words (``Tokenizer.words``) ask for: (digit or None, {attribute: bin name}).

    The inverse of ``caption``: the first digit word, and every phrase of ``PHRASES`` found among the words.
    """
    words = list(words)
    digit = next((DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS), None)
    text = f" {' '.join(words)} "
    asked = {}
    for attribute, phrasings in PHRASES.items():
        for bin_name, phrases in phrasings.items():
            if any(f" {phrase} " in text for phrase in phrases):
                asked[attribute] = bin_name
    return digit, asked


def signed_margin(values, digits, attribute: str, bin_name: str, thresholds: dict) -> np.ndarray:
    """How far each value lies inside ``bin_name`` (> 0) or outside it (< 0): the distance to the nearer cut of
    the bin, in the attribute's units, with the cuts of each value's digit."""
    low, high = thresholds[attribute][np.asarray(digits)].T
    edges = {0: (-np.inf, low), 1: (low, high), 2: (high, np.inf)}[BINS[attribute].index(bin_name)]
    return np.minimum(values - edges[0], edges[1] - values)
