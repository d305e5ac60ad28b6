"""Your own images: a folder of PNG, JPEG or WebP files as a dataset (``--dataset folder:PATH``).

Layout
    PATH/*.png                      one unconditional set of images, or
    PATH/<class>/**/*.jpg           one class per sub-folder, labels 0, 1, ... in the order of the
                                    sorted folder names (which the run records, for ``--label NAME``).

    Sub-folders that hold no image are not classes; hidden files and folders
    (a leading dot) are not looked at; other files (a README, a .txt) are
    counted and left out. Images both loose in PATH and in class folders, or a
    single class folder, are refused with a message saying what to do.

Preparation (``prepare``)
    Each image is turned upright (its EXIF orientation), converted to grey
    ("L") or colour ("RGB") by the run's ``in_channels``, scaled (Lanczos) so
    that its shorter side is ``side`` and cut to the centre square: uint8
    (N, side, side) or (N, side, side, 3). A run with ``crop="random"``
    prepares them a little larger (``stored_side``) and takes a random window
    of each at every step (``diffusion.data.augment``). A file that cannot be
    decoded is skipped, and named in the result.

Cache (``load``)
    Decoding is done once: the arrays go into one npz file under
    ``<data_dir>/folders/`` whose name holds the folder's *fingerprint*, the
    sha256 of every image file's path, size and modification time. Any file
    added, removed or changed gives another fingerprint, so the cache is
    rebuilt (and the stale one removed); a folder that changes while it is
    read is refused. A run pins the fingerprint when it starts
    (``diffusion.runs.start_config``), so resuming it on a changed folder,
    which would not see the same batches, is refused too.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion import files
from diffusion.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MODES = {1: "L", 3: "RGB"}  # in_channels -> the Pillow mode images are converted to
CACHE_VERSION = 1  # part of every cache file's name: a change of preparation here makes old caches unused


class Listing(NamedTuple):
    """What a folder holds: its image files (paths relative to ``root``, sorted), their labels, the classes'
    names (() for a folder without class folders), the other files left out, and the fingerprint."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    other_files: tuple[str, ...]
    fingerprint: str


class Folder(NamedTuple):
    """A prepared folder: uint8 images (N, side, side[, 3]), labels (N,), the classes' names, the fingerprint,
    the files that could not be decoded (each with why), and the cache file they come from."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    fingerprint: str
    unreadable: tuple[str, ...]
    cache: Path


def _visible_files(folder: Path):
    """Every file under ``folder`` (recursively, sorted), leaving out hidden files and folders."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _shown(names, limit: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def scan(root) -> Listing:
    """List the images of the folder ``root`` and their classes (see the module docstring); a ``DataError``
    for a folder that is missing, empty of images or laid out ambiguously."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder" if root.exists() else f"the folder {root} does not exist")
    found = list(_visible_files(root))
    images = [p for p in found if _is_image(p)]
    others = tuple(p.relative_to(root).as_posix() for p in found if not _is_image(p))
    if not images:
        held = f"; it holds {len(others)} other file(s): {_shown(others)}" if others else ""
        raise DataError(
            f"no images in {root} or its sub-folders (looked for {', '.join(IMAGE_SUFFIXES)}){held}"
        )
    loose = [p for p in images if p.parent == root]
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in images if p.parent != root}))
    if loose and class_names:
        raise DataError(
            f"{root} has {len(loose)} image(s) directly in it ({_shown(p.name for p in loose)}) and class "
            f"folders ({_shown(class_names)}): move the loose images into a class folder, or point --dataset at "
            "a folder that holds only one kind"
        )
    if len(class_names) == 1:
        raise DataError(
            f"{root} has a single class folder, {class_names[0]}: a class-conditional model needs two or more. "
            f"To train without classes, use --dataset folder:{root / class_names[0]}"
        )
    index = {name: i for i, name in enumerate(class_names)}
    labels = tuple(index[p.relative_to(root).parts[0]] if class_names else 0 for p in images)
    digest = hashlib.sha256()
    for path in images:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return Listing(root, tuple(p.relative_to(root).as_posix() for p in images), labels, class_names, others,
                   digest.hexdigest())


def stored_side(image_size: int, crop: str) -> int:
    """The side images are prepared at: ``image_size`` for centre crops; an eighth more for random ones (32 ->
    36), so that a random ``image_size`` window of each can be taken at every step."""
    return image_size if crop == "center" else image_size + image_size // 8


def prepare(path, side: int, channels: int) -> np.ndarray:
    """The image file ``path`` upright, in ``MODES[channels]``, its shorter side scaled to ``side`` (Lanczos)
    and cut to the centre square: uint8 (side, side) or (side, side, 3). Raises OSError or
    ``PIL.UnidentifiedImageError`` if it cannot be decoded."""
    with Image.open(path) as image:
        image.draft(MODES[channels], (side, side))  # JPEG: decode at a reduced scale, much faster for photos
        image = ImageOps.exif_transpose(image).convert(MODES[channels])
        return np.asarray(ImageOps.fit(image, (side, side), Image.Resampling.LANCZOS))


def _decode(listing: Listing, side: int, channels: int):
    images, labels, unreadable = [], [], []
    for name, label in zip(listing.files, listing.labels):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's warnings on odd metadata: the pixels are what count
                images.append(prepare(listing.root / name, side, channels))
            labels.append(label)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            unreadable.append(f"{name} ({error})")
    return images, labels, tuple(unreadable)


def cache_folder(cache_dir) -> Path:
    return Path(cache_dir).expanduser() / "folders"


def _cache_stem(root: Path, side: int, channels: int) -> str:
    """The part of a cache file's name that says which folder and preparation it is for."""
    key = json.dumps([str(root.resolve()), side, channels, CACHE_VERSION])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load(root, side: int, channels: int, cache_dir, expect: str | None = None) -> Folder:
    """The images of the folder ``root`` prepared at ``side`` with ``channels``: from the cache in
    ``cache_dir`` if the folder's fingerprint is the one cached, else decoded, checked unchanged, and cached
    (atomically; any older cache of the same folder and preparation is removed).

    A ``DataError`` if no image can be decoded, the folder changes while it is read, or its fingerprint is not
    ``expect`` (when given: a run's pinned one), which is checked before anything is decoded.
    """
    if channels not in MODES:
        raise DataError(f"a folder of images is read as grey (1 channel) or RGB (3), not {channels} channels")
    listing = scan(root)
    if expect is not None and listing.fingerprint != expect:
        raise DataError(
            f"{listing.root} has changed since this run started (files added, removed or rewritten): resuming "
            "would not see the same images. Put the folder back as it was, or start a new run with another --name"
        )
    stem = _cache_stem(listing.root, side, channels)
    path = cache_folder(cache_dir) / f"{stem}-{listing.fingerprint[:16]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as cached:
                if str(cached["fingerprint"]) == listing.fingerprint:
                    return Folder(cached["images"], cached["labels"], tuple(cached["class_names"].tolist()),
                                  listing.fingerprint, tuple(cached["unreadable"].tolist()), path)
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is rebuilt below
    images, labels, unreadable = _decode(listing, side, channels)
    if not images:
        raise DataError(f"none of the {len(listing.files)} images in {listing.root} could be decoded: "
                        f"{_shown(unreadable)}")
    if scan(root).fingerprint != listing.fingerprint:
        raise DataError(f"{listing.root} changed while it was being read (files added, removed or rewritten); "
                        "run again once it is settled")
    arrays = dict(
        images=np.stack(images), labels=np.asarray(labels, np.int32), fingerprint=np.array(listing.fingerprint),
        class_names=np.array(listing.class_names, dtype=str), unreadable=np.array(unreadable, dtype=str),
    )
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.write_atomically({path: buffer.getvalue()})
    for stale in path.parent.glob(f"{stem}-*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return Folder(arrays["images"], arrays["labels"], listing.class_names, listing.fingerprint, unreadable, path)
