"""Data to fine-tune on and judges to score the result: letters rendered from fonts, restyled digits.

A diffusion model trained on MNIST knows ten things: the digits. Fine-tuning
with LoRA (Hu et al. 2021: freeze the weights, learn a low-rank update of some
of them) teaches it something more from a little data. This module makes that
data inside the project, with no download, and the judges that measure what a
fine-tuned model draws. Two kinds of lesson:

A new concept: a new label
    Letters that the digits never showed, e.g. "A", "K", "X", each becoming a
    new class label. DreamBooth (Ruiz et al. 2023) taught a text-to-image model
    a new subject from three to five photographs; here a few (or a few
    hundred) rendered letters play the photographs. ``render_letters`` draws
    them from the DejaVu fonts that matplotlib ships.

A style: the same labels, drawn differently
    Every digit keeps its label but is drawn another way: ``"hollow"`` (an
    outline of the stroke, a hollow tube) or ``"italic"`` (a fixed slant).
    ``STYLES`` maps each name to its transform; ``stylize`` applies one.

Rendering letters like MNIST digits
    MNIST's digits (LeCun, Bottou, Bengio & Haffner 1998; the MNIST page by
    LeCun, Cortes & Burges) were normalised this way: the bounding box of the
    character scaled to fit a 20 x 20 box, keeping its aspect ratio, then the
    character placed in the 28 x 28 frame with its centre of mass at the
    centre (pixel (14, 14), measured on the embedded digits). ``render_letters``
    does the same to a glyph, at 4x the resolution, then gives each image its
    own small random affine change (rotation, scale, shear, shift) and averages
    4 x 4 blocks down to 28 x 28: white anti-aliased ink on black, uint8.
    Regular-weight fonts draw strokes about as wide as MNIST's pen (~2 px);
    each image widens its stroke by a random 0 to 1 px and picks one of six
    fonts (sans, serif, mono; upright, slanted; one bold), so the letters vary
    as handwriting does.

Judges
    A fine-tuned model's pictures are scored by the small CNN of
    ``diffusion.classifier`` trained with more classes: ``letter_judge`` knows
    the ten digits plus the new letters (letter i of ``letters`` is class
    10 + i); ``style_judge`` knows plain and styled digits (digit d is class d
    plain and 10 + d styled). ``concept_accuracy`` is the fraction of
    generated images a judge puts in the intended class. A judge is only as
    good as what it cannot cheat on: ``style_judge`` explains how a first
    italic judge learned to spot interpolation blur instead of slant, and
    how it is trained so that it cannot. ``hollowness`` and ``slant`` measure
    the two styles directly, with no training at all.

Seeds
    The images a letter judge trains and is validated on must not be the
    images a model is fine-tuned on, or the judge could merely recognise
    copies. So two seeds are reserved: ``JUDGE_SEED`` (the judge's training
    letters) and ``VALIDATION_SEED`` (the held-out letters that
    ``validate_letter_judge`` scores). Draw fine-tuning letters with any other
    seed; ``FINE_TUNING_SEED`` (0) is the one to use by default.

Letters that a digit could pass for ("O", "I", "l", "S", "Z", "B", "g", "q",
...) make poor concepts: a viewer cannot tell a drawn "O" from a "0". The
judge can, but only because typeset letters differ from handwritten digits
in texture (a judge of "OlSZ" still scored 99 % on held-out letters and 98 %
on digits): a shortcut of the kind ``style_judge`` warns about. With letters
that no digit resembles ("A", "K", "X", "H", "M", "W") its verdict means what
it says.
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import ft2font
from scipy import ndimage

from diffusion import classifier, data
from diffusion.errors import DataError, InputError, is_whole

FINE_TUNING_SEED = 0  # the default seed for the letters a model is fine-tuned on
JUDGE_SEED = 1000  # reserved: the letters a letter judge is trained on (and its weights' seed)
VALIDATION_SEED = 1001  # reserved: the held-out letters validate_letter_judge scores
RESERVED_SEEDS = (JUDGE_SEED, VALIDATION_SEED)

NEW_CLASS_OFFSET = data.NUM_CLASSES  # letter i, or the styled digit i, is judged as class 10 + i


# ---------------------------------------------------------------------------
# Letters
# ---------------------------------------------------------------------------

# Six DejaVu faces that ship with matplotlib (mpl-data/fonts/ttf). The bold
# sans faces are left out: their strokes (~3.5 px at this size) are heavier
# than almost any MNIST digit's.
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif-Bold.ttf",
)
STROKE_WIDENINGS = (0.0, 0.3, 0.6, 1.0)  # pixels added to the stroke's width (half on each side)

SIZE = 28  # the frame, as MNIST
BOX = 20  # the character's bounding box is scaled to fit BOX x BOX, as MNIST
CENTRE = 14.0  # where the centre of mass goes, in pixel indices (row, column), as measured on MNIST
SUPERSAMPLE = 4  # glyphs are placed and jittered at 4x the resolution, then averaged down
GLYPH_PIXELS = 128  # the size (em) glyphs are rasterised at, before scaling into the box

# The random affine change of each image, drawn uniformly in these ranges.
MAX_ROTATION_DEGREES = 12.0
SCALES = (0.85, 1.1)
MAX_SHEAR = 0.2  # columns move by shear x rows
MAX_SHIFT = 1.5  # pixels, in each direction


def font_path(name: str) -> Path:
    """The path of one of matplotlib's bundled fonts, e.g. ``font_path("DejaVuSans.ttf")``."""
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise DataError(f"the font {name} that matplotlib ships is missing ({path}); reinstall matplotlib")
    return path


def check_letters(letters) -> str:
    """Return ``letters`` if it is a non-empty string of distinct ASCII letters (A-Z, a-z); else raise InputError.

    Upper and lower case are different letters: ``"Aa"`` asks for two concepts.
    """
    if not isinstance(letters, str) or not letters:
        raise InputError(f"letters must be a non-empty string such as 'AKX', got {letters!r}")
    bad = sorted({ch for ch in letters if not (ch.isascii() and ch.isalpha())})
    if bad:
        raise InputError(f"letters may hold only A-Z and a-z; {letters!r} has {', '.join(map(repr, bad))}")
    repeated = sorted({ch for ch in letters if letters.count(ch) > 1})
    if repeated:
        raise InputError(f"each letter may appear once; {letters!r} repeats {', '.join(map(repr, repeated))}")
    return letters


@functools.lru_cache(maxsize=None)
def _glyph(font: str, letter: str) -> np.ndarray:
    """One letter rasterised by FreeType (matplotlib's ft2font), cropped to its ink: float32 in [0, 1]."""
    face = ft2font.FT2Font(str(font_path(font)))
    face.set_size(GLYPH_PIXELS, 72)  # points at 72 dpi: GLYPH_PIXELS pixels to the em
    face.set_text(letter, 0.0, flags=ft2font.LoadFlags.NO_HINTING)  # hinting is for small sizes on screens
    face.draw_glyphs_to_bitmap(antialiased=True)
    ink = np.asarray(face.get_image(), np.float32) / 255.0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _disk(radius: float) -> np.ndarray:
    """A boolean disk of ``radius`` pixels: the footprint of a round pen."""
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= radius**2 + 1e-9


@functools.lru_cache(maxsize=None)
def _normalised_glyph(font: str, letter: str, widening: float) -> np.ndarray:
    """The letter placed as MNIST placed digits, at ``SUPERSAMPLE`` x resolution: float32 (112, 112) in [0, 1].

    Scaled so that its bounding box, stroke widening included, fits the 20 x 20
    box with its aspect ratio kept; widened by a round pen (grey dilation);
    moved so its centre of mass lands on pixel (14, 14). A letter whose centre
    of mass is far off its box's centre ("T", "L") can lose a sliver at the
    frame's edge, as some MNIST digits do.
    """
    s = SUPERSAMPLE
    glyph = _glyph(font, letter)
    radius = widening * s / 2  # in high-resolution pixels
    zoom = (BOX * s - 2 * radius) / max(glyph.shape)
    glyph = np.clip(ndimage.zoom(glyph, zoom, order=1, grid_mode=True, mode="grid-constant"), 0.0, 1.0)
    if radius > 0:
        glyph = ndimage.grey_dilation(np.pad(glyph, int(np.ceil(radius))), footprint=_disk(radius))

    # Paste it so that its centre of mass falls on CENTRE (clipping at the frame if need be).
    target = CENTRE * s + (s - 1) / 2  # the high-resolution index of the centre of final pixel 14
    top, left = (int(round(target - c)) for c in ndimage.center_of_mass(glyph))
    canvas = np.zeros((SIZE * s, SIZE * s), np.float32)
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + glyph.shape[0], SIZE * s), min(left + glyph.shape[1], SIZE * s)
    canvas[t0:t1, l0:l1] = glyph[t0 - top : t1 - top, l0 - left : l1 - left]
    return canvas


def _jitter(canvas: np.ndarray, angle: float, scale: float, skew: float, shift) -> np.ndarray:
    """Apply one small affine change about the centre (high resolution), then average 4 x 4 blocks to 28 x 28.

    The forward map sends a point p to M (p - c) + c + t, M = rotation x shear
    (by ``skew``) x scale, c the centre; ``affine_transform`` wants the inverse, output -> input:
    p = M^-1 q + c - M^-1 (c + t).
    """
    s = SUPERSAMPLE
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, 0.0], [skew, 1.0]]) * scale
    inverse = np.linalg.inv(forward)
    centre = np.full(2, CENTRE * s + (s - 1) / 2)
    offset = centre - inverse @ (centre + np.asarray(shift) * s)
    moved = ndimage.affine_transform(canvas, inverse, offset=offset, order=1)
    return moved.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))


def render_letters(letters: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images of each letter of ``letters``: ``(images, index)``, uint8 (N, 28, 28) and int (N,).

    ``index[k]`` is the position in ``letters`` of image k's letter; images come
    grouped by letter, in the order of ``letters``. White ink on black, 0..255,
    normalised like MNIST and randomly varied (font, stroke width, rotation,
    scale, shear, shift: see the module docstring and the constants above).

    Deterministic: the images of letter L depend only on (``seed``, L) and
    image k only on k, drawn from ``np.random.default_rng([seed, ord(L)])``. So
    ``render_letters("AK", n, s)`` holds the very "K"s of
    ``render_letters("K", n, s)``, and the first 5 of 500 images are the 5 a
    count of 5 gives: a few-shot set is a prefix of a larger one.
    Seeds 1000 and 1001 are the judges' (``RESERVED_SEEDS``); draw
    fine-tuning data with another.
    """
    check_letters(letters)
    if not is_whole(count, 1):
        raise InputError(f"count must be a whole number >= 1 (images per letter), got {count!r}")
    if not is_whole(seed, 0):
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")
    images = np.zeros((len(letters) * count, SIZE, SIZE), np.uint8)
    for i, letter in enumerate(letters):
        # One row of 7 uniform numbers per image, so image k does not depend on count.
        u = np.random.default_rng([seed, ord(letter)]).random((count, 7))
        for k, row in enumerate(u):
            font = FONTS[int(row[0] * len(FONTS))]
            widening = STROKE_WIDENINGS[int(row[1] * len(STROKE_WIDENINGS))]
            angle = np.deg2rad(MAX_ROTATION_DEGREES * (2 * row[2] - 1))
            scale = SCALES[0] + (SCALES[1] - SCALES[0]) * row[3]
            skew = MAX_SHEAR * (2 * row[4] - 1)
            shift = MAX_SHIFT * (2 * row[5:7] - 1)
            ink = _jitter(_normalised_glyph(font, letter, widening), angle, scale, skew, shift)
            images[i * count + k] = np.rint(np.clip(ink, 0.0, 1.0) * 255)
    return images, np.repeat(np.arange(len(letters)), count)


# ---------------------------------------------------------------------------
# Styles: fixed transforms of the digits
# ---------------------------------------------------------------------------

ITALIC_SHEAR = 0.35  # columns per row: the top of a 20-pixel digit moves 3.5 px right, the bottom 3.5 px left

_SQUARE = np.ones((1, 3, 3), bool)  # (image, row, column) footprints that never reach across images
_CROSS = ndimage.generate_binary_structure(2, 1)[np.newaxis]


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise InputError(
            f"need uint8 images (N, H, W) in 0..255, as diffusion.data.load_dataset gives; "
            f"got {images.dtype} {images.shape}"
        )
    return images


def hollow(images) -> np.ndarray:
    """Outlined digits: the stroke thickened a little, then only its outline kept, a hollow tube.

    Grey-level morphology on each uint8 image (N, H, W): a dilation by a 3 x 3
    square widens the stroke by a pixel on each side; subtracting the erosion
    of that (by a plus-shaped cross) leaves a 1-pixel wall around a dark core.
    (Thickened - eroded is the "inner morphological gradient".) The
    thickening comes first so that even a thin stroke has a core to hollow out.
    """
    ink = _check_images(images).astype(np.float32) / 255.0
    thick = ndimage.grey_dilation(ink, footprint=_SQUARE)
    wall = thick - ndimage.grey_erosion(thick, footprint=_CROSS)
    return np.rint(np.clip(wall, 0.0, 1.0) * 255).astype(np.uint8)


def _centres_of_mass(ink: np.ndarray) -> np.ndarray:
    """(N, 2) ink-weighted mean (row, column) of each image; the frame's centre for a blank one."""
    _, h, w = ink.shape
    mass = ink.sum(axis=(1, 2))
    rows = (ink.sum(axis=2) * np.arange(h)).sum(axis=1)
    cols = (ink.sum(axis=1) * np.arange(w)).sum(axis=1)
    safe = np.where(mass > 0, mass, 1.0)
    centres = np.stack([rows / safe, cols / safe], axis=1)
    return np.where(mass[:, None] > 0, centres, [(h - 1) / 2, (w - 1) / 2])


def shear(images, amount, shift=0.0) -> np.ndarray:
    """Each image (uint8 (N, H, W)) sheared about its own centre of mass by ``amount`` (one number, or one each).

    A pixel ``dy`` rows above the centre of mass moves ``amount * dy`` columns
    to the right (bilinear interpolation). A shear maps the centre of mass to
    itself, so a centred digit stays centred: no recentring is needed. Two
    shears about the same point add up: ``shear(shear(x, a), b)`` is
    ``shear(x, a + b)``, bar rounding, with one interpolation instead of two.
    ``shift`` ((row, column) pixels, or (N, 2)) then moves the images, in the
    same single interpolation.
    """
    ink = _check_images(images).astype(np.float32)
    n, h, w = ink.shape
    amount = np.broadcast_to(np.asarray(amount, np.float64), (n,))[:, None, None]
    shift = np.broadcast_to(np.asarray(shift, np.float64), (n, 2))
    centres = _centres_of_mass(ink)
    k, r, c = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    # Where each output pixel comes from: undo the shift, then the shear (a shift along the row).
    source_r = r - shift[:, 0, None, None]
    source_c = c - shift[:, 1, None, None] - amount * (centres[:, 0, None, None] - source_r)
    sheared = ndimage.map_coordinates(ink, [k, source_r, source_c], order=1, mode="constant", cval=0.0)
    return np.rint(np.clip(sheared, 0, 255)).astype(np.uint8)


def italic(images) -> np.ndarray:
    """Slanted digits: each image ``shear``-ed by ``ITALIC_SHEAR`` (0.35) about its centre of mass."""
    return shear(images, ITALIC_SHEAR)


STYLES = {"hollow": hollow, "italic": italic}


def stylize(images, style: str) -> np.ndarray:
    """``images`` (uint8 (N, H, W)) redrawn in ``style``, one of ``STYLES``: uint8, same shape."""
    if style not in STYLES:
        raise InputError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    return STYLES[style](images)


def hollowness(images) -> np.ndarray:
    """(N,) floats in [0, 1]: how much of each drawn shape is dark inside, high for hollow digits.

    The ink (pixels >= 128) is thickened by 2 pixels (binary dilation by a 5 x 5
    square), everything it encloses is filled (``binary_fill_holes``), and it
    is thinned back (erosion by the same square): the solid silhouette the
    character would have if drawn with a filled pen. Hollowness is the dark
    fraction of that silhouette. A plain digit scores mostly its loops (on
    average 0.02 for a "1", 0.4 for a "0"); a hollow one adds the core of
    every stroke. On the 1,000 embedded test digits the means are 0.23 plain
    and 0.68 hollow, and every hollow digit scores above its plain self.
    """
    ink = _check_images(images) >= 128
    square = np.ones((1, 5, 5), bool)
    thick = ndimage.binary_dilation(ink, structure=square)
    # A structure with no neighbours across axis 0 fills each image's holes separately.
    filled = ndimage.binary_fill_holes(thick, structure=_CROSS)
    silhouette = ndimage.binary_erosion(filled, structure=square)
    dark = (silhouette & ~ink).sum(axis=(1, 2))
    return dark / np.maximum(silhouette.sum(axis=(1, 2)), 1)


def slant(images) -> np.ndarray:
    """(N,) floats: how far each image's ink leans right, in columns per row upwards.

    The ink-weighted least-squares slope of column against height (rows counted
    upwards): 0 for an upright character, positive when the top is further
    right. ``italic`` adds exactly ``ITALIC_SHEAR`` to it (up to interpolation
    and ink pushed out of the frame). Blank images score 0.
    """
    ink = _check_images(images).astype(np.float64)
    _, h, w = ink.shape
    centres = _centres_of_mass(ink)
    up = centres[:, 0, None, None] - np.arange(h)[None, :, None]  # rows above the centre of mass
    right = np.arange(w)[None, None, :] - centres[:, 1, None, None]
    covariance = (ink * up * right).sum(axis=(1, 2))
    variance = (ink * up**2).sum(axis=(1, 2))
    return covariance / np.where(variance > 0, variance, 1.0)


# ---------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------


def judge_predictions(judge: classifier.DigitClassifier, images) -> np.ndarray:
    """The class ``judge`` gives each uint8 image (N, 28, 28): (N,) ints, the argmax of its logits."""
    images = _check_images(images)
    if images.shape[1:] != (SIZE, SIZE) or len(images) == 0:
        raise InputError(f"a judge needs one or more 28 x 28 images, got shape {images.shape}")
    logits, _ = classifier.logits_and_features(judge, data.to_model_range(images))
    return logits.argmax(axis=1)


def concept_accuracy(judge: classifier.DigitClassifier, images, target_labels) -> float:
    """The fraction of ``images`` (uint8 (N, 28, 28)) that ``judge`` puts in their target class.

    ``target_labels`` is one class for all (e.g. ``10`` for the first letter
    of a letter judge) or one per image. Used on a fine-tuned model's
    generations, this is the share that came out as asked.
    """
    predictions = judge_predictions(judge, images)
    targets = np.asarray(target_labels)
    if targets.shape not in ((), predictions.shape):
        raise InputError(f"target_labels must be one class or one per image ({len(predictions)}), got {targets.shape}")
    return float(np.mean(predictions == targets))


def _check_judge(judge: classifier.DigitClassifier, num_classes: int, what: str) -> None:
    if judge.head.out_features != num_classes:
        raise InputError(
            f"this judge has {judge.head.out_features} classes but {what} needs {num_classes}; "
            f"validate it with what it was trained for"
        )


def letter_judge(
    letters: str,
    *,
    images_per_letter: int = 1000,
    steps: int = 1000,
    seed: int = JUDGE_SEED,
    log_every: int = 0,
) -> classifier.DigitClassifier:
    """A classifier of the 10 digits plus ``letters``: class d is digit d, class 10 + i is ``letters[i]``.

    Trained (``diffusion.classifier.train_classifier``) on the 9,000 embedded
    training digits and ``images_per_letter`` letters rendered with ``seed``,
    which also seeds the weights and batches. The default ``JUDGE_SEED`` is
    reserved for this, so the judge never sees the fine-tuning letters. About
    a minute on two idle CPU cores with the defaults (1,000 steps of
    128 images); on "AKX" it scored 100 % on held-out letters and 98.8 % on
    the test digits.
    """
    check_letters(letters)
    digits, digit_labels = data.load_embedded_mnist("train")
    letter_images, index = render_letters(letters, images_per_letter, seed)
    images = np.concatenate([digits, letter_images])
    labels = np.concatenate([digit_labels.astype(np.int64), NEW_CLASS_OFFSET + index])
    return classifier.train_classifier(
        images, labels, steps=steps, seed=seed, log_every=log_every, num_classes=NEW_CLASS_OFFSET + len(letters)
    )


def validate_letter_judge(
    judge: classifier.DigitClassifier, letters: str, *, images_per_letter: int = 200, seed: int = VALIDATION_SEED
) -> dict[str, float]:
    """How well ``judge`` (from ``letter_judge(letters)``) recognises what it was not trained on.

    Returns ``{"digits": accuracy on the 1,000 embedded test digits,
    "letters": accuracy on images_per_letter fresh letters each, rendered
    with seed, and one entry per letter, e.g. "A": its own accuracy}``.
    """
    check_letters(letters)
    _check_judge(judge, NEW_CLASS_OFFSET + len(letters), f"letters {letters!r}")
    digits, digit_labels = data.load_embedded_mnist("test")
    letter_images, index = render_letters(letters, images_per_letter, seed)
    letter_hits = judge_predictions(judge, letter_images) == NEW_CLASS_OFFSET + index
    scores = {
        "digits": concept_accuracy(judge, digits, digit_labels),
        "letters": float(letter_hits.mean()),
    }
    scores.update({letter: float(letter_hits[index == i].mean()) for i, letter in enumerate(letters)})
    return scores


JUDGE_SHEAR_WOBBLE = 0.1  # style judges see digits sheared by up to this much either way, see style_judge


def _half_pixel_shift(images) -> np.ndarray:
    """Images moved half a pixel down and right (bilinear): the same shapes, a little softer."""
    return shear(images, 0.0, shift=(0.5, 0.5))


def style_judge(style: str, *, steps: int = 1000, seed: int = 0, log_every: int = 0) -> classifier.DigitClassifier:
    """A 20-class classifier of plain and styled digits: class d is a plain d, class 10 + d a ``style`` d.

    Trained on the 9,000 embedded training digits, each shown twice in each
    class (36,000 images): sheared by a random "wobble" of up to
    +-``JUDGE_SHEAR_WOBBLE`` (0.1), and wobbled again and moved by a random
    fraction of a pixel. The plain class shows these views plain; the styled
    class shows them redrawn by ``stylize`` (for italic, sheared once by
    0.35 + wobble rather than twice).

    The views deny the judge a shortcut (Geirhos et al. 2020, "Shortcut
    learning in deep neural networks"). Trained on plain digits against their
    italic copies, a judge learned that any bilinear resampling means
    italic: it called 99 % of plain digits moved by half a pixel italic, and
    94 % of digits sheared by a mere 0.1, because interpolation softens the
    strokes and only the italic copies had been resampled. (Adding resampled
    plain digits beside the untouched ones still left over a quarter of
    softened digits judged italic: sharp then meant plain.) With every training image
    resampled alike, softness says nothing and the slant itself must be
    judged; the "plain softened" score of ``validate_style_judge`` checks it.
    A diffusion model's samples are softer or sharper than MNIST in their own
    way, so this matters for the judge's real work.

    About a minute on two idle CPU cores with the defaults. Hollow is
    easy to judge (96 to 99 % right); italic is not, because handwritten
    digits slant by themselves (the slant of plain test digits spreads with a
    standard deviation of 0.28, nearly the italic shear): about 13 % of plain
    digits are judged italic and 80 % of italic ones.
    """
    if style not in STYLES:
        raise InputError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    digits, labels = data.load_embedded_mnist("train")
    rng = np.random.default_rng(seed)
    wobbles = rng.uniform(-JUDGE_SHEAR_WOBBLE, JUDGE_SHEAR_WOBBLE, (2, len(digits)))
    shifts = rng.uniform(-0.5, 0.5, (len(digits), 2))
    plain = [shear(digits, wobbles[0]), shear(digits, wobbles[1], shifts)]
    if style == "italic":
        styled = [shear(digits, ITALIC_SHEAR + wobbles[0]), shear(digits, ITALIC_SHEAR + wobbles[1], shifts)]
    else:
        styled = [stylize(view, style) for view in plain]
    images = np.concatenate(plain + styled)
    labels = np.concatenate([labels, labels, NEW_CLASS_OFFSET + labels, NEW_CLASS_OFFSET + labels]).astype(np.int64)
    return classifier.train_classifier(
        images, labels, steps=steps, seed=seed, log_every=log_every, num_classes=2 * NEW_CLASS_OFFSET
    )


def validate_style_judge(judge: classifier.DigitClassifier, style: str) -> dict[str, float]:
    """How well ``judge`` (from ``style_judge(style)``) does on the 1,000 embedded test digits.

    Returns the fractions of

    ``"plain"``          plain digits judged plain and the right digit;
    ``"styled"``         styled digits judged styled and the right digit;
    ``"style"``          all 2,000 judged in the right style, whatever the digit;
    ``"plain softened"`` plain digits moved half a pixel (bilinear, so a little
                         blurred) judged plain and the right digit: low if the
                         judge has learned "soft means styled" (see ``style_judge``).
    """
    _check_judge(judge, 2 * NEW_CLASS_OFFSET, f"style {style!r}")
    digits, labels = data.load_embedded_mnist("test")
    plain = judge_predictions(judge, digits)
    styled = judge_predictions(judge, stylize(digits, style))
    return {
        "plain": float(np.mean(plain == labels)),
        "styled": float(np.mean(styled == NEW_CLASS_OFFSET + labels)),
        "style": float(np.mean(np.concatenate([plain < NEW_CLASS_OFFSET, styled >= NEW_CLASS_OFFSET]))),
        "plain softened": concept_accuracy(judge, _half_pixel_shift(digits), labels),
    }
