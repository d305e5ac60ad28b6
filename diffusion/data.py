"""Data: the embedded MNIST digits, downloads (MNIST, Fashion-MNIST, CIFAR-10), your own folders, minibatches.

Everything here is plain NumPy; the training code turns batches into JAX arrays.

Images
    ``load_dataset(name, split)`` returns ``(images, labels)``: uint8 pixels
    0..255, of shape (N, H, W) for grey images and (N, H, W, 3) for colour
    ones, and labels (N,) uint8. The datasets:

    ``mnist-embedded``  10,000 MNIST digits that ship inside the package
                        (``diffusion/data/mnist_embedded.npz``, see the README
                        next to it), split into 9,000 train / 1,000 test digits.
                        Works offline; the default.
    ``mnist``           the full MNIST (LeCun, Cortes & Burges): 60,000 train,
                        10,000 test, 28 x 28 grey. Downloaded once into the cache folder.
    ``fashion-mnist``   Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017), same
                        sizes and file format, pictures of clothes.
    ``cifar10``         CIFAR-10 (Krizhevsky 2009): 50,000 train, 10,000 test,
                        32 x 32 colour photographs of ten classes.
    ``folder:PATH``     your own images (``diffusion.folders``): any size, resized
                        to the run's ``image_size``, grey or colour; one class
                        per sub-folder. ``load_run_data(config)`` reads them.

    ``to_model_range`` maps a batch of uint8 pixels to the float range [-1, 1]
    the diffusion model works in, in the NHWC layout (JAX's convention) with
    a channel axis for grey images too; ``from_model_range`` maps model outputs
    back to uint8 pixels of the dataset's layout.

Batches
    ``batches`` yields shuffled minibatches forever. The shuffle of each epoch
    is a function of (seed, epoch) only, so a run can restart at any step and
    see exactly the batches it would have seen. ``augment`` takes random crops
    and horizontal flips of a batch, from a generator seeded by the step.
    ``prefetch`` prepares the next batches in a background thread while the
    accelerator trains on this one.
"""

import gzip
import hashlib
import http.client
import importlib.resources
import os
import queue
import tarfile
import tempfile
import threading
import urllib.request
from pathlib import Path

import numpy as np

from diffusion import folders
from diffusion.errors import DataError, InputError

DATASET_NAMES = ("mnist-embedded", "mnist", "fashion-mnist", "cifar10")
DIGIT_DATASETS = ("mnist-embedded", "mnist")  # the handwritten digits: what captions and the metrics' classifier know
FOLDER = "folder:"  # a dataset named folder:PATH is the images in PATH (diffusion.folders)
SPLITS = ("train", "test")

NUM_CLASSES = 10
# (image_size, channels) of each named dataset; a run on one takes them unless told otherwise.
SHAPES = {"mnist-embedded": (28, 1), "mnist": (28, 1), "fashion-mnist": (28, 1), "cifar10": (32, 3)}
# The classes' names, which sample.py accepts for --label (a folder's are its sub-folders' names).
CLASS_NAMES = {
    "mnist-embedded": tuple("0123456789"),
    "mnist": tuple("0123456789"),
    "fashion-mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle-boot"),  # (Xiao et al. 2017, Table 1)
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def is_folder(name: str) -> bool:
    """Whether the dataset ``name`` is a folder of the user's images (``folder:PATH``)."""
    return name.startswith(FOLDER)


# ---------------------------------------------------------------------------
# The embedded digits
# ---------------------------------------------------------------------------

EMBEDDED_TEST_PER_CLASS = 100  # 10 x 100 = 1,000 test digits; the other 9,000 are for training


def _embedded_test_mask(images, labels):
    """Boolean mask of the embedded digits held out for testing: the same 100 digits of each class, forever.

    Within each class, every image is ranked by the sha256 of its 784 pixel
    bytes and the 100 lowest are held out. A hash is used rather than a seeded
    random permutation because NumPy does not promise that a seeded generator
    gives the same numbers in every version; the hash ranking depends only on
    the pixels, so the split cannot drift.
    """
    hashes = np.array([hashlib.sha256(image.tobytes()).hexdigest() for image in images])
    mask = np.zeros(len(images), dtype=bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        # Stable sort: equal hashes (duplicate images) keep file order.
        ranked = members[np.argsort(hashes[members], kind="stable")]
        mask[ranked[:EMBEDDED_TEST_PER_CLASS]] = True
    return mask


def load_embedded_mnist(split="train"):
    """The MNIST digits that ship with the package: ``(images, labels)``.

    ``split="train"`` gives 9,000 digits and ``split="test"`` the 1,000 others
    (100 per class, held out of training). Images are (N, 28, 28) uint8 in
    0..255, labels (N,) uint8 in 0..9, in the order of the file (grouped by
    class; ``batches`` shuffles).
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    resource = importlib.resources.files("diffusion") / "data" / "mnist_embedded.npz"
    with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    test = _embedded_test_mask(images, labels)
    keep = test if split == "test" else ~test
    return images[keep], labels[keep]


# ---------------------------------------------------------------------------
# Full MNIST, Fashion-MNIST and CIFAR-10: download, verify, cache
# ---------------------------------------------------------------------------

# MNIST and Fashion-MNIST come as four gzipped IDX files with the same names.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Public mirrors, tried in order. (yann.lecun.com, the original home of MNIST,
# has at times refused downloads, so it is left out.)
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        "https://storage.googleapis.com/cvdf-datasets/mnist",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",  # Zalando's own bucket (HTTP only)
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz",),  # Alex Krizhevsky's page, the dataset's home
}

# sha256 of the official gz files. Every download is checked against these, so
# a plain-HTTP mirror is as safe as an HTTPS one. Provenance: the values were
# written down from memory and then checked against published code that
# verifies the same files (torchvision's prototype dataset loader,
# torchvision/prototype/datasets/_builtin/mnist.py, and several independent
# projects, all agreeing). They were not recomputed from the files themselves:
# the machine this was written on could not reach the mirrors.
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    # The "binary version" (170,052,171 bytes), not the Python one, whose batches are pickles. The sum is the one
    # TensorFlow Datasets checks (its url_checksums for cifar10), and agrees with several independent projects.
    "cifar10": {"cifar-10-binary.tar.gz": "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"},
}

DOWNLOAD_TIMEOUT_S = 60


def data_dir():
    """The cache folder for downloads: ``$DIFFUSION_DATA_DIR`` if set, else ``~/.cache/diffusion-jax``."""
    return Path(os.environ.get("DIFFUSION_DATA_DIR") or Path.home() / ".cache" / "diffusion-jax").expanduser()


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_verified(url, target, sha256):
    """Download ``url`` to ``target`` only if its sha256 matches; otherwise leave ``target`` untouched.

    The bytes go to a temporary file next to ``target`` and are hashed on the
    way. Only a verified file is renamed into place (``os.replace`` is atomic),
    so ``target`` is either absent or complete and correct, never half written.
    On any failure, Ctrl-C included, the temporary file is deleted.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise DataError(
                f"wrong sha256 (corrupted or not the official file): expected {sha256}, got {digest.hexdigest()}"
            )
        os.replace(tmp_name, target)
    except BaseException:
        os.unlink(tmp_name)
        raise


def download_dataset(name, cache_dir=None, base_url=None):
    """Make sure the files of ``name`` (``SHA256[name]``) are in the cache; return the folder holding them.

    ``name`` is ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``. Files go to
    ``<cache_dir>/<name>/`` (``cache_dir`` defaults to ``data_dir()``). A file
    already there is kept if its sha256 is right and downloaded again if not.
    Each file is fetched from the mirrors in ``MIRRORS[name]`` in turn, or from
    ``base_url`` alone when given (any URL urllib opens, ``file://`` included),
    and checked against ``SHA256[name]``.

    Raises ``DataError`` if a file cannot be fetched and verified from any
    mirror; the message lists each attempt and what to do instead.
    """
    if name not in SHA256:
        raise InputError(f"no download for dataset {name!r}; downloadable datasets: {', '.join(SHA256)}")
    folder = Path(cache_dir if cache_dir is not None else data_dir()).expanduser() / name
    folder.mkdir(parents=True, exist_ok=True)
    base_urls = (base_url,) if base_url is not None else MIRRORS[name]
    for filename, sha256 in SHA256[name].items():
        target = folder / filename
        if target.exists() and _file_sha256(target) == sha256:
            continue
        failures = []
        for base in base_urls:
            url = f"{base.rstrip('/')}/{filename}"
            try:
                _fetch_verified(url, target, sha256)
                break
            except (OSError, http.client.HTTPException, DataError) as err:
                # OSError covers urllib's URLError and HTTPError, timeouts and refused connections.
                failures.append(f"  {url}: {err}")
        else:
            raise DataError(
                f"could not download {filename} of {name}:\n"
                + "\n".join(failures)
                + f"\nIf this machine has no network, train on the embedded digits instead "
                f"(--dataset mnist-embedded), or fetch the file(s) "
                f"{', '.join(SHA256[name])} elsewhere and copy them into {folder}; "
                f"they are checked against known sha256 sums."
            )
    return folder


# IDX type codes (third byte of the magic number) and the big-endian dtypes they stand for.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read an IDX file (the MNIST file format), gzipped or not, into a NumPy array.

    Layout: a 4-byte magic number ``0x00 0x00 <type code> <ndim>``, then
    ``ndim`` big-endian uint32 sizes, then the values, big-endian, row-major.
    A file that does not follow it (bad magic, unknown type, wrong length)
    raises ``DataError``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # the gzip magic number
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a truncated gzip raises EOFError
        raise DataError(f"cannot read {path}: {err}") from err

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file: bad magic number {raw[:4].hex()!r}")
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: IDX header truncated ({len(raw)} bytes, need {header_size})")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX dimensions {shape} need {expected} bytes, the file has {len(raw)}")
    values = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def _read_image_classification(folder, split):
    """Read and sanity-check the (images, labels) IDX pair of one split."""
    images_file, labels_file = IDX_FILES[split]
    images, labels = read_idx(folder / images_file), read_idx(folder / labels_file)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{folder}: expected uint8 images (N, H, W) and labels (N,), "
            f"got {images.dtype} {images.shape} and {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{folder}: {labels_file} has labels outside 0..9")
    return images, labels


CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue planes, 32 x 32 each, row-major


def read_cifar(path, split="train"):
    """One split of the CIFAR-10 binary archive ``path`` (``cifar-10-binary.tar.gz``): ``(images, labels)``,
    uint8 (N, 32, 32, 3) and (N,) 0..9. The archive is read in place, never unpacked to disk.

    Each batch file is a run of 3,073-byte records: the label, then 1,024 red, 1,024 green and 1,024 blue
    bytes, each plane row by row (Krizhevsky's description on the dataset's page). A file that does not
    follow it raises ``DataError``.
    """
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            for name in CIFAR_FILES[split]:
                if name not in members:
                    raise DataError(f"{path} has no {name}: it is not the CIFAR-10 binary archive")
                raw = archive.extractfile(members[name]).read()
                if len(raw) % CIFAR_RECORD:
                    raise DataError(f"{path}: {name} is {len(raw)} bytes, not a whole number of 3,073-byte records")
                records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
                labels.append(records[:, 0])
                images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    except (OSError, EOFError, tarfile.TarError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    labels = np.concatenate(labels)
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{path}: labels outside 0..9 in the {split} split")
    return np.ascontiguousarray(np.concatenate(images)), labels


def load_dataset(name="mnist-embedded", split="train", cache_dir=None):
    """``(images, labels)`` of one split of a named dataset: uint8 images 0..255, (N, 28, 28) grey or
    (N, 32, 32, 3) colour (``SHAPES``), and (N,) uint8 labels 0..9.

    ``name`` is one of ``DATASET_NAMES`` and ``split`` is ``"train"`` or
    ``"test"``. ``mnist``, ``fashion-mnist`` and ``cifar10`` are downloaded into
    ``cache_dir`` (see ``download_dataset``) the first time. (A folder of your
    own images is read by ``load_run_data``, which knows the size to make them.)
    """
    if is_folder(name):
        raise InputError(f"{name} is a folder of images: read it with load_run_data(config), which resizes them")
    if name not in DATASET_NAMES:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)} or folder:PATH")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if name == "mnist-embedded":
        return load_embedded_mnist(split)
    if name == "cifar10":
        return read_cifar(download_dataset(name, cache_dir) / "cifar-10-binary.tar.gz", split)
    return _read_image_classification(download_dataset(name, cache_dir), split)


def load_folder(config, pinned: bool = False) -> folders.Folder:
    """The images of a run on ``folder:PATH`` prepared as its config says (``image_size``, ``in_channels``,
    ``crop``), from the cache under ``data_dir()`` if it is current (``diffusion.folders.load``); with ``pinned``,
    only if the folder is still the one the run started on (its ``dataset_sha256``), else a ``DataError``."""
    side = folders.stored_side(config.image_size, config.crop)
    expect = config.dataset_sha256 if pinned else None
    return folders.load(config.dataset[len(FOLDER):], side, config.in_channels, data_dir(), expect)


def load_run_data(config, split="train"):
    """``(images, labels)`` of a run's dataset: a named one's ``split``, or a folder's images prepared as the
    run's config says (a folder has one split: ``test`` gives the same images as ``train``)."""
    if is_folder(config.dataset):
        folder, size = load_folder(config), config.image_size
        margin = (folders.stored_side(size, config.crop) - size) // 2  # random crops: the centre window
        return folder.images[:, margin : margin + size, margin : margin + size], folder.labels
    return load_dataset(config.dataset, split)


# ---------------------------------------------------------------------------
# Pixels <-> model range
# ---------------------------------------------------------------------------


def scale_pixels(pixels):
    """uint8 pixels 0..255 -> float32 in [-1, 1], any shape: 0 maps to -1 and 255 to +1.

    The diffusion model adds unit-variance Gaussian noise, so data centred on 0
    with a range of about +-1 is on the same scale as the noise.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    return pixels.astype(np.float32) / 127.5 - 1.0


def to_model_range(images):
    """A batch of uint8 pixels, (N, H, W) grey or (N, H, W, C), -> float32 (N, H, W, C) in [-1, 1].

    Grey images gain a trailing channel axis of size 1: the NHWC layout that
    JAX convolutions use. The values as ``scale_pixels``.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise InputError(f"to_model_range expects a batch (N, H, W) or (N, H, W, C), got shape {images.shape}")
    x = scale_pixels(images)
    return x[..., np.newaxis] if images.ndim == 3 else x


def from_model_range(x):
    """float (..., H, W, C) in [-1, 1] -> uint8 pixels: (..., H, W) for one channel (grey, as the datasets
    hold them), (..., H, W, C) otherwise; the inverse of ``to_model_range``.

    Values outside [-1, 1] (a sampler can overshoot) are clipped, then
    rounded to the nearest pixel value.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 3:
        raise InputError(f"from_model_range expects images (..., H, W, C), got shape {x.shape}")
    pixels = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return pixels[..., 0] if x.shape[-1] == 1 else pixels


# ---------------------------------------------------------------------------
# Minibatches
# ---------------------------------------------------------------------------


def batches(images, labels, batch_size, seed, start_step=0):
    """Yield shuffled ``(x, y)`` minibatches forever, starting at step ``start_step``.

    Each epoch visits the examples in a fresh random order, the permutation
    drawn from a generator seeded with ``(seed, epoch)``; the last
    ``len(images) % batch_size`` examples of each order are dropped so every
    batch has ``batch_size`` examples. Step ``s`` is batch ``s % steps_per_epoch``
    of epoch ``s // steps_per_epoch``, which depends on nothing else, so
    ``batches(..., start_step=k)`` yields exactly what ``batches(...)`` yields
    after skipping k batches: a restarted training run sees the same data.
    """
    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 1 or start_step < 0:
        raise InputError(f"need batch_size >= 1 and start_step >= 0, got {batch_size} and {start_step}")
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        raise InputError(f"batch_size {batch_size} is larger than the dataset ({len(images)} examples)")

    epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(images))
        for step in range(step_in_epoch, steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            yield images[idx], labels[idx]
        epoch, step_in_epoch = epoch + 1, 0



def augment(images, rng: np.random.Generator, size: int, flip: bool):
    """Random ``size`` x ``size`` crops of a batch of uint8 images (N, S, S[, C]), each mirrored left-right with
    probability 1/2 if ``flip`` (the augmentations of Krizhevsky et al. 2012, Sec. 4.1; DDPM flips its CIFAR-10
    images, Ho et al. 2020, Appendix B). The offsets and flips come from ``rng``: seeded by the step, a resumed
    run draws the same ones."""
    n, side = len(images), images.shape[1]
    rows, cols = rng.integers(0, side - size + 1, size=(2, n))
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    out = np.empty((n, size, size, *images.shape[3:]), images.dtype)
    for i, (r, c) in enumerate(zip(rows, cols)):
        crop = images[i, r : r + size, c : c + size]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


_END = object()  # what prefetch's thread hands over when the iterator is exhausted


def prefetch(iterator, depth: int = 2):
    """The items of ``iterator``, made ``depth`` ahead in a background thread: while the accelerator runs one
    training step, the host prepares the next batches (the same ones, in the same order). An exception in the
    thread is raised here, at the item it stopped at; closing the generator stops the thread."""
    ready, stop = queue.Queue(depth), threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((None, _END))
        except BaseException as error:  # handed to the consumer, which raises it
            ready.put((None, error))

    threading.Thread(target=work, daemon=True, name="prefetch").start()
    try:
        while True:
            item, error = ready.get()
            if error is _END:
                return
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
