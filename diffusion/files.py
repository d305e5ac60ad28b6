"""Files on disk: written so that nothing is ever half-written, and known by their sha256.

Every output of the project goes through here: checkpoints (a folder,
``atomic_folder``), generated images and GIFs, and the classifier's weights
(files, ``write_atomically``). Both write beside the target under a hidden
temporary name, flush to disk (``fsync``), and only then rename into place
(``os.replace``, atomic on POSIX file systems) and flush the folder's entry too:
a crash, a full disk, Ctrl-C or a power cut
leaves either the old contents or the complete new ones, and no stray
temporary files. ``sha256_of`` names a file's contents: a checkpoint's weights
or an input image are pinned by it, so a file changed since is caught.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_of(path) -> str:
    """The sha256 of a file's contents, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_synced(path, content: bytes) -> None:
    """Write ``content`` to ``path`` and flush it to disk (no rename: for files inside ``atomic_folder``)."""
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(folder) -> None:
    """Flush a folder's entries to disk, so that a rename into it survives a power cut (POSIX ``fsync`` on the
    folder itself)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomically(files: dict) -> None:
    """Write {path: bytes}: each into a temporary file beside its target, then all renamed into place.

    If anything fails before the renames, the temporary files are removed and
    no target is touched.
    """
    temporary = []
    try:
        for path, content in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(handle)
            temporary.append((name, path))
            write_synced(name, content)
            os.chmod(name, 0o644)  # mkstemp makes files private to the user
        for name, path in temporary:
            os.replace(name, path)
        for folder in {path.parent for _, path in temporary}:
            sync_folder(folder)
    except BaseException:
        for name, _ in temporary:
            if os.path.exists(name):
                os.remove(name)
        raise


@contextlib.contextmanager
def atomic_folder(final):
    """``with atomic_folder(path) as tmp:`` fill the temporary folder ``tmp``; on success it replaces ``path``.

    An existing ``path`` is replaced whole; if the block raises, ``tmp`` is
    removed and ``path`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private to the user
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        sync_folder(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
