"""Checkpoints as ``.npz``: written atomically (a crash never leaves a half-written file), read
without pickle (a checkpoint is data, never code). Nested dicts are flattened to "a/b/c" keys;
strings (JSON configs, RNG states) are stored as 0-d unicode arrays."""
import os
import tempfile
import zipfile

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit (the message names the file/tensor)."""


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if "/" in key:
            raise ValueError(f"checkpoint key {key!r} must not contain '/'")
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield prefix + key, np.asarray(value)


def _unflatten(flat):
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.item() if value.dtype.kind == "U" else value
    return tree


def check_writable(path):
    """Raise OSError now if ``path`` could not be written later: make and remove a temp file in its
    directory, as the atomic writes do. (``os.access`` says yes to root even where the kernel says no,
    e.g. under /proc, and a failure after an hour of sampling loses the hour.)"""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(21, "is a directory", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None  # name the user's path, not the temp file's
    os.close(fd)
    os.unlink(tmp)


def save(path, tree):
    """Write a nested dict of arrays/strings/numbers to ``path`` atomically: temp file in the same
    directory, fsync, then rename over the target (rename is atomic on POSIX)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint gets the usual file mode
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(_flatten(tree)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path):
    """Read a checkpoint written by ``save`` back into a nested dict (no pickle)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            return _unflatten({key: f[key] for key in f.files})
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a tinyddpm checkpoint ({e})") from None
