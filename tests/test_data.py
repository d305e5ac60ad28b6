"""Tests for diffusion.data. No network: downloads are served from tmp_path (file:// or 127.0.0.1)."""

import functools
import gzip
import hashlib
import importlib.resources
import http.server
import os
import socket
import threading
import time

import numpy as np
import pytest

from diffusion import data

# sha256 of the embedded test split (images then labels, in the order returned).
# If this changes, the train / test split of the embedded digits has moved.
EMBEDDED_TEST_SPLIT_SHA256 = "60244abb3faf60cedcd112b953e68ed224297e09fb3494badf4ef1d3d0093ca9"


# ---------------------------------------------------------------------------
# Embedded digits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return {split: data.load_embedded_mnist(split) for split in data.SPLITS}


def test_embedded_shapes_dtypes_and_ranges(embedded):
    for split, n in [("train", 9000), ("test", 1000)]:
        images, labels = embedded[split]
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.uint8
        assert images.min() == 0 and images.max() == 255
        assert set(np.unique(labels)) == set(range(10))
    counts = np.bincount(np.concatenate([embedded["train"][1], embedded["test"][1]]), minlength=10)
    assert counts.sum() == 10_000 and counts.min() > 800 and counts.max() < 1200
    assert np.bincount(embedded["test"][1], minlength=10).tolist() == [100] * 10


def test_embedded_split_is_disjoint_and_covers_the_file(embedded):
    def as_set(images, labels):
        return {(image.tobytes(), int(label)) for image, label in zip(images, labels)}

    train, test = as_set(*embedded["train"]), as_set(*embedded["test"])
    assert len(train) == 9000 and len(test) == 1000  # no duplicates inside a split
    assert not train & test
    with np.load(importlib.resources.files("diffusion") / "data" / "mnist_embedded.npz") as npz:
        assert train | test == as_set(npz["images"], npz["labels"])


def test_embedded_split_is_deterministic_and_pinned(embedded):
    images, labels = data.load_embedded_mnist("test")
    np.testing.assert_array_equal(images, embedded["test"][0])
    np.testing.assert_array_equal(labels, embedded["test"][1])
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == EMBEDDED_TEST_SPLIT_SHA256


def test_load_dataset_defaults_to_embedded_train(embedded):
    images, labels = data.load_dataset()
    np.testing.assert_array_equal(images, embedded["train"][0])
    np.testing.assert_array_equal(labels, embedded["train"][1])


def test_unknown_dataset_and_split_list_the_valid_ones():
    with pytest.raises(ValueError) as err:
        data.load_dataset("imagenet")
    for name in ("mnist-embedded", "mnist", "fashion-mnist", "cifar10", "folder:PATH"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="load_run_data"):
        data.load_dataset("folder:/some/where")
    with pytest.raises(ValueError, match="train, test"):
        data.load_dataset("mnist-embedded", "validation")
    with pytest.raises(ValueError, match="train, test"):
        data.load_embedded_mnist("heldout")
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10"):
        data.download_dataset("mnist-embedded")


# ---------------------------------------------------------------------------
# Pixels <-> model range
# ---------------------------------------------------------------------------


def test_model_range_round_trip_and_bounds():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    x = data.to_model_range(pixels)
    assert x.dtype == np.float32 and x.shape == (1, 16, 16, 1)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x[..., 0], pixels / 127.5 - 1.0, atol=1e-6)
    back = data.from_model_range(x)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels)


def test_from_model_range_clips_and_rounds():
    x = np.array([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0], dtype=np.float32).reshape(1, 1, 6, 1)
    np.testing.assert_array_equal(data.from_model_range(x).ravel(), [0, 0, 128, 255, 255, 255])


def test_model_range_keeps_colour_channels():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = data.to_model_range(pixels)
    assert x.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(x, pixels / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(data.from_model_range(x), pixels)  # colour stays (N, H, W, 3)
    np.testing.assert_array_equal(data.scale_pixels(pixels[0]), x[0])  # one image, any shape


def test_model_range_rejects_wrong_inputs():
    with pytest.raises(TypeError):
        data.to_model_range(np.zeros((2, 28, 28), dtype=np.float32))  # already converted
    with pytest.raises(ValueError, match="batch"):
        data.to_model_range(np.zeros((28, 28), dtype=np.uint8))  # one image, not a batch
    with pytest.raises(ValueError):
        data.from_model_range(np.zeros((28, 28), dtype=np.float32))  # no channel axis


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def toy_dataset(n=10):
    images = np.arange(n, dtype=np.int64)[:, None] * np.ones((1, 3), dtype=np.int64)
    return images, np.arange(n)  # label i belongs to the image filled with i


def test_batches_shapes_and_pairing():
    images, labels = toy_dataset()
    for x, y in take(data.batches(images, labels, batch_size=3, seed=0), 7):
        assert x.shape == (3, 3) and y.shape == (3,)
        np.testing.assert_array_equal(x[:, 0], y)  # images and labels stay paired


def test_batches_each_epoch_is_a_permutation_without_the_remainder():
    images, labels = toy_dataset(10)  # batch 3 -> 3 steps per epoch, 1 example dropped per epoch
    ys = [y for _, y in take(data.batches(images, labels, batch_size=3, seed=0), 9)]
    epochs = [np.concatenate(ys[i : i + 3]) for i in (0, 3, 6)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 9  # nine distinct examples, none repeated
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled per epoch


def test_batches_same_seed_same_batches_other_seed_other_batches():
    images, labels = toy_dataset(100)
    a = take(data.batches(images, labels, batch_size=8, seed=1), 30)
    b = take(data.batches(images, labels, batch_size=8, seed=1), 30)
    c = take(data.batches(images, labels, batch_size=8, seed=2), 30)
    assert all(np.array_equal(ya, yb) for (_, ya), (_, yb) in zip(a, b))
    assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


@pytest.mark.parametrize("start_step", [0, 1, 2, 3, 4, 7, 12])
def test_batches_resume_exactly(start_step):
    images, labels = toy_dataset(10)  # 3 steps per epoch, so these cross epoch boundaries
    full = take(data.batches(images, labels, batch_size=3, seed=5), start_step + 6)
    resumed = take(data.batches(images, labels, batch_size=3, seed=5, start_step=start_step), 6)
    for (xf, yf), (xr, yr) in zip(full[start_step:], resumed):
        np.testing.assert_array_equal(xf, xr)
        np.testing.assert_array_equal(yf, yr)


def test_augment_crops_and_flips_reproducibly():
    images = np.random.default_rng(0).integers(0, 256, (64, 9, 9, 3), dtype=np.uint8)
    out = data.augment(images, np.random.default_rng([0, 5, 1]), 8, flip=True)
    assert out.shape == (64, 8, 8, 3) and out.dtype == np.uint8
    again = data.augment(images, np.random.default_rng([0, 5, 1]), 8, flip=True)
    np.testing.assert_array_equal(out, again)  # the same generator state: the same crops and flips
    flipped = offsets = 0
    for image, crop in zip(images, out):  # each output is one of the 4 windows of its image, mirrored or not
        windows = {(r, c, f): (image[r : r + 8, c : c + 8, :][:, ::-1] if f else image[r : r + 8, c : c + 8])
                   for r in (0, 1) for c in (0, 1) for f in (False, True)}
        (r, c, f), = [key for key, window in windows.items() if np.array_equal(window, crop)]
        flipped, offsets = flipped + f, offsets + r + c
    assert 16 < flipped < 48 and 32 < offsets < 96  # about half mirrored, offsets spread over 0 and 1
    unflipped = data.augment(images[:, :8, :8], np.random.default_rng(1), 8, flip=False)
    np.testing.assert_array_equal(unflipped, images[:, :8, :8])  # no room to move, no flip: unchanged


def test_batches_rejects_bad_arguments():
    images, labels = toy_dataset(10)
    with pytest.raises(ValueError):
        next(data.batches(images, labels, batch_size=11, seed=0))
    with pytest.raises(ValueError):
        next(data.batches(images, labels[:5], batch_size=2, seed=0))


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


def idx_bytes(array):
    """Encode ``array`` (uint8 or int32) in the IDX format."""
    type_code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_gzipped_and_plain(tmp_path):
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "a").write_bytes(idx_bytes(array))
    for name in ("a.gz", "a"):
        result = data.read_idx(tmp_path / name)
        assert result.dtype == np.uint8
        np.testing.assert_array_equal(result, array)


def test_read_idx_multibyte_big_endian(tmp_path):
    array = np.array([[-70000, 1], [258, 2**31 - 1]], dtype=np.int32)
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.gz"), array)


@pytest.mark.parametrize(
    "content, message",
    [
        (gzip.compress(b"\x00\x01\x08\x01" + b"\x00\x00\x00\x02" + b"ab"), "magic"),  # second byte not 0
        (gzip.compress(b"\x00\x00\x07\x01" + b"\x00\x00\x00\x02" + b"ab"), "magic"),  # unknown type code
        (gzip.compress(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02"), "truncated"),  # sizes missing
        (gzip.compress(b"\x00\x00\x08\x02" + b"\x00\x00\x00\x02\x00\x00\x00\x03" + b"abcde"), "need"),  # 5 of 6 values
        (gzip.compress(b"\x00\x00\x08\x02" + b"\x00\x00\x00\x02\x00\x00\x00\x03" + b"abcdefg"), "need"),  # 7, not 6
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02abc")[:-6], "cannot read"),  # truncated gzip
        (b"\x1f\x8b" + b"not really gzip", "cannot read"),
    ],
    # named: gzip's header holds the time it was made, so ids drawn from the bytes differ between the two
    # pytest-xdist workers when they collect in different seconds, and the run stops
    ids=["magic byte", "type code", "sizes missing", "too few values", "too many values", "truncated gzip", "not gzip"],
)
def test_read_idx_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.gz"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.read_idx(path)


# ---------------------------------------------------------------------------
# Downloads (offline: file:// and a local HTTP server)
# ---------------------------------------------------------------------------


def files_under(folder):
    """Every file below ``folder``, hidden temporary files included."""
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder holding four small MNIST-like gz IDX files; SHA256["mnist"] patched to their hashes.

    Also points MIRRORS["mnist"] at a closed port, so a test that forgets
    base_url fails instead of reaching the real internet.
    """
    folder = tmp_path / "served"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [("train", 6), ("test", 4)]:
        images_file, labels_file = data.IDX_FILES[split]
        arrays[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        (folder / images_file).write_bytes(gzip.compress(idx_bytes(arrays[split][0])))
        (folder / labels_file).write_bytes(gzip.compress(idx_bytes(arrays[split][1])))
    hashes = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in data.SHA256["mnist"]}
    monkeypatch.setitem(data.SHA256, "mnist", hashes)
    monkeypatch.setitem(data.MIRRORS, "mnist", (f"http://127.0.0.1:{closed_port()}",))
    return folder, arrays


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_url(served):
    folder, _ = served
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_from_file_url_then_load_offline(tmp_path, served):
    folder, arrays = served
    cache = tmp_path / "cache"
    result = data.download_dataset("mnist", cache_dir=cache, base_url=folder.as_uri())
    assert result == cache / "mnist"
    assert files_under(cache) == sorted(os.path.join("mnist", f) for f in data.SHA256["mnist"])  # no temp files left
    for f in data.SHA256["mnist"]:
        assert (result / f).read_bytes() == (folder / f).read_bytes()
    # The cache is complete, so loading needs no network (the mirrors point at a closed port).
    for split in data.SPLITS:
        images, labels = data.load_dataset("mnist", split, cache_dir=cache)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])


def test_download_over_http(tmp_path, served, http_url):
    folder, _ = served
    cache = tmp_path / "cache"
    data.download_dataset("mnist", cache_dir=cache, base_url=http_url)
    for f in data.SHA256["mnist"]:
        assert (cache / "mnist" / f).read_bytes() == (folder / f).read_bytes()


def test_download_uses_the_data_dir_environment_variable(tmp_path, served, monkeypatch):
    folder, _ = served
    monkeypatch.setenv("DIFFUSION_DATA_DIR", str(tmp_path / "from-env"))
    assert data.data_dir() == tmp_path / "from-env"
    data.download_dataset("mnist", base_url=folder.as_uri())
    assert len(files_under(tmp_path / "from-env" / "mnist")) == 4


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.data_dir() == tmp_path / ".cache" / "diffusion-jax"


@pytest.mark.parametrize("transport", ["file", "http"])
def test_corrupted_download_fails_and_leaves_nothing(tmp_path, served, request, transport):
    folder, _ = served
    first = next(iter(data.SHA256["mnist"]))  # the first file downloaded
    (folder / first).write_bytes(b"these are not the bytes you are looking for")
    base_url = folder.as_uri() if transport == "file" else request.getfixturevalue("http_url")
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError) as err:
        data.download_dataset("mnist", cache_dir=cache, base_url=base_url)
    assert "sha256" in str(err.value) and first in str(err.value)
    assert files_under(cache) == []  # neither the bad file nor its temporary file


def test_bad_cached_file_is_downloaded_again(tmp_path, served):
    folder, _ = served
    cache = tmp_path / "cache"
    first = next(iter(data.SHA256["mnist"]))
    (cache / "mnist").mkdir(parents=True)
    (cache / "mnist" / first).write_bytes(b"half a download")
    data.download_dataset("mnist", cache_dir=cache, base_url=folder.as_uri())
    assert (cache / "mnist" / first).read_bytes() == (folder / first).read_bytes()


def test_unreachable_server_gives_a_clear_error(tmp_path, served):
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError) as err:
        data.download_dataset("mnist", cache_dir=cache)  # MIRRORS["mnist"] is a closed port (see `served`)
    message = str(err.value)
    assert "could not download train-images-idx3-ubyte.gz" in message
    assert "--dataset mnist-embedded" in message and str(cache / "mnist") in message
    assert files_under(cache) == []


def test_missing_file_on_server_gives_a_clear_error(tmp_path, served, http_url):
    folder, _ = served
    (folder / "train-images-idx3-ubyte.gz").unlink()  # the server answers 404
    with pytest.raises(data.DataError, match="404"):
        data.download_dataset("mnist", cache_dir=tmp_path / "cache", base_url=http_url)
    assert files_under(tmp_path / "cache") == []


def test_load_dataset_rejects_inconsistent_files(tmp_path, served):
    folder, _ = served
    cache = tmp_path / "cache"
    data.download_dataset("mnist", cache_dir=cache, base_url=folder.as_uri())
    labels_file = data.IDX_FILES["test"][1]
    bad_labels = gzip.compress(idx_bytes(np.array([1, 2, 3, 12], dtype=np.uint8)))  # 12 is not a digit
    (cache / "mnist" / labels_file).write_bytes(bad_labels)
    # data.SHA256["mnist"] is the dict `served` patched in, so this edit ends with the test.
    data.SHA256["mnist"][labels_file] = hashlib.sha256(bad_labels).hexdigest()
    with pytest.raises(data.DataError, match="labels outside 0..9"):
        data.load_dataset("mnist", "test", cache_dir=cache)


# ---------------------------------------------------------------------------
# CIFAR-10: the binary archive, written small by the test
# ---------------------------------------------------------------------------


def cifar_archive(path, per_batch=3, seed=0, names=None, extra_bytes=0):
    """A small tar.gz laid out as cifar-10-binary.tar.gz, with random records; returns (train, test) arrays."""
    import io
    import tarfile

    rng = np.random.default_rng(seed)
    splits = {}
    with tarfile.open(path, "w:gz") as archive:
        for split, files in data.CIFAR_FILES.items():
            images, labels = [], []
            for name in names or files:
                planes = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
                label = rng.integers(0, 10, per_batch, dtype=np.uint8)
                raw = np.concatenate([label[:, None], planes.reshape(per_batch, -1)], axis=1).tobytes()
                raw += b"\0" * extra_bytes
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(raw)
                archive.addfile(info, io.BytesIO(raw))
                images.append(planes.transpose(0, 2, 3, 1))  # red, green, blue planes -> (H, W, 3)
                labels.append(label)
            splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits


def test_cifar_download_then_read_offline(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    expected = cifar_archive(served / "cifar-10-binary.tar.gz")
    digest = hashlib.sha256((served / "cifar-10-binary.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(data.SHA256, "cifar10", {"cifar-10-binary.tar.gz": digest})
    monkeypatch.setitem(data.MIRRORS, "cifar10", (served.as_uri(),))
    cache = tmp_path / "cache"
    for split in data.SPLITS:
        images, labels = data.load_dataset("cifar10", split, cache_dir=cache)
        assert images.shape == (len(labels), 32, 32, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, expected[split][0])  # the planes interleaved into pixels
        np.testing.assert_array_equal(labels, expected[split][1])
    assert len(expected["train"][1]) == 15 and files_under(cache) == ["cifar10/cifar-10-binary.tar.gz"]
    assert data.to_model_range(images).shape == (len(labels), 32, 32, 3)


def test_cifar_archive_that_is_not_one_is_refused(tmp_path):
    cifar_archive(tmp_path / "wrong.tar.gz", names=["something_else.bin"])
    with pytest.raises(data.DataError, match="has no data_batch_1.bin"):
        data.read_cifar(tmp_path / "wrong.tar.gz")
    cifar_archive(tmp_path / "torn.tar.gz", extra_bytes=5)
    with pytest.raises(data.DataError, match="3,073-byte records"):
        data.read_cifar(tmp_path / "torn.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_cifar(tmp_path / "junk.tar.gz")


def test_prefetch_gives_the_same_items_and_hands_over_errors():
    assert list(data.prefetch(iter(range(50)), depth=3)) == list(range(50))
    stream = data.batches(*toy_dataset(10), batch_size=3, seed=0)
    ahead = data.prefetch(data.batches(*toy_dataset(10), batch_size=3, seed=0))
    for _ in range(7):
        (x, y), (xp, yp) = next(stream), next(ahead)
        np.testing.assert_array_equal(x, xp)
        np.testing.assert_array_equal(y, yp)
    ahead.close()  # stops its thread (an endless iterator)
    for _ in range(50):
        if not any(t.name == "prefetch" for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert not any(t.name == "prefetch" for t in threading.enumerate())

    def failing():
        yield 1
        raise ValueError("bad item 2")

    got = data.prefetch(failing())
    assert next(got) == 1
    with pytest.raises(ValueError, match="bad item 2"):
        next(got)
