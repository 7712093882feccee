"""MNIST (LeCun, Cortes and Burges, 1998) for training: from IDX files on disk, a verified download,
or the embedded 10,000-image subset, in that order. Every file is checked against its published
SHA-256 before use; anything wrong ends in one ``DataError`` that names the file.

IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``00 00 08 ndim`` (0x08 =
unsigned byte), ``ndim`` big-endian uint32 sizes, then the bytes of the array in C order.
"""
import dataclasses
import gzip
import hashlib
import http.client
import importlib.resources
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file is missing, corrupt, truncated or fails its checksum (the message names it)."""


@dataclasses.dataclass(frozen=True)
class MNIST:
    images: np.ndarray  # uint8 (N, 28, 28), 0 = background, 255 = ink
    labels: np.ndarray  # int64 (N,), digits 0-9
    source: str         # the file path or URL the images came from, or the embedded subset


# Tried in order; a module attribute so tests (and users behind a proxy) can point elsewhere.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# SHA-256 of the *decompressed* IDX bytes. Hashing the content rather than the .gz makes one table
# cover the .gz and raw variants, and mirrors that recompressed the files (whose .gz bytes differ).
# The train values were computed from a local copy; all four agree with the published values in
# several independent third-party listings of the uncompressed files.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

EMBEDDED_SUBSET = "assets/mnist_subset.npz"  # inside the package; built by scripts/make_mnist_subset.py
EMBEDDED_SOURCE = "embedded subset (10,000 images)"
# SHA-256 of the subset's images bytes followed by its labels bytes (uint8, C order): exactly the first
# 10,000 images and labels of the verified training files. (The .npz bytes themselves are not
# reproducible: zip entries carry a timestamp.)
EMBEDDED_SHA256 = "2e49afdffc567fd5f9f306a04e2bafced2432146ae04f4b9a58b25505ba05b2e"

DOWNLOAD_TIMEOUT_S = 30     # per network operation, so a dead mirror cannot hang training
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_GZIP_MAGIC = b"\x1f\x8b"


def _file_names(split):
    """The canonical (images, labels) IDX names of a split, e.g. "train-images-idx3-ubyte"."""
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find(directory, name):
    """``name`` in ``directory`` as .gz or raw, also in the "train-images.idx3-ubyte" spelling some
    mirrors use; None where absent."""
    dotted = name.replace("-idx", ".idx")
    for candidate in (name + ".gz", name, dotted + ".gz", dotted):
        path = Path(directory) / candidate
        if path.is_file():
            return path
    return None


def _decompressed(raw, label):
    """The IDX bytes of a file's contents, gunzipped where they start with the gzip magic number
    (sniffed, not taken from the name, so a download's temp file needs no special suffix)."""
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{label}: corrupt or truncated gzip data ({e})") from None


def _parse_idx(data, ndim, label):
    """The uint8 array in IDX bytes whose magic number must say ``ndim`` dimensions."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{label}: truncated ({len(data)} bytes, the IDX header alone needs {header})")
    magic, expected = int.from_bytes(data[:4], "big"), 0x0800 + ndim
    if magic != expected:
        raise DataError(f"{label}: magic number 0x{magic:08x}, expected 0x{expected:08x} "
                        f"(not an MNIST {'images' if ndim == 3 else 'labels'} IDX file)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = len(data) - header
    if size != np.prod(shape):
        problem = "truncated" if size < np.prod(shape) else "has trailing bytes"
        raise DataError(f"{label}: {problem} (header says {'x'.join(map(str, shape))} = "
                        f"{np.prod(shape)} bytes of data, file has {size})")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)  # a view: no copy


def _read_verified(path, name, label):
    """Parse the IDX file at ``path`` as the MNIST file ``name`` and check its SHA-256."""
    try:
        data = _decompressed(Path(path).read_bytes(), label)
    except OSError as e:
        raise DataError(f"{label}: cannot read ({e.strerror})") from None
    array = _parse_idx(data, 3 if "images" in name else 1, label)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise DataError(f"{label}: SHA-256 mismatch (got {digest[:16]}..., expected "
                        f"{SHA256[name][:16]}... for {name}); delete it and retry")
    return array


def _load_pair(images_path, labels_path, split, source):
    images_name, labels_name = _file_names(split)
    images = _read_verified(images_path, images_name, str(images_path))
    labels = _read_verified(labels_path, labels_name, str(labels_path))
    return MNIST(images, labels.astype(np.int64), source)


def load_idx_dir(directory, split="train"):
    """The MNIST ``split`` from the IDX files in ``directory`` (any spelling _find accepts),
    verified by SHA-256; a DataError if either file is missing or bad."""
    names = _file_names(split)
    paths = [_find(directory, name) for name in names]
    for name, path in zip(names, paths):
        if path is None:
            raise DataError(f"{directory}: no {name}(.gz) file")
    return _load_pair(*paths, split, str(paths[0]))


def _cache_dir():
    return Path.home() / ".cache" / "tinyddpm" / "mnist"


def _download(name, cache):
    """Fetch ``name``.gz from the first mirror that has it into ``cache``, atomically: into a temp
    file in the same directory, verified, then renamed (so the cache never holds a bad file).
    Returns (path, url), or None if no mirror could be reached; a DataError if one served bad data."""
    cache.mkdir(parents=True, exist_ok=True)
    for mirror in MIRRORS:
        url = mirror + name + ".gz"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".part", dir=cache)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                total = int(response.headers.get("Content-Length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False, disable=None) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
            _read_verified(tmp, name, url)
            path = cache / (name + ".gz")
            os.replace(tmp, path)
            return path, url
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # 404s, timeouts, cut transfers
            logger.warning("MNIST: %s failed (%s), trying the next mirror", url, getattr(e, "reason", e))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None


def _download_pair(split, cache):
    """Both files of ``split`` in the cache, downloading the missing ones; None if a mirror
    could not be reached for one of them."""
    found = []
    for name in _file_names(split):
        path = _find(cache, name)
        if path is None:
            fetched = _download(name, cache)
            if fetched is None:
                return None
            path, url = fetched
        else:
            url = str(path)
        found.append((path, url))
    (images_path, source), (labels_path, _) = found
    return _load_pair(images_path, labels_path, split, source)


def _load_embedded():
    """The first 10,000 training images, shipped inside the package for offline use."""
    resource = importlib.resources.files(__package__) / EMBEDDED_SUBSET
    try:
        with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{resource}: embedded MNIST subset unreadable ({e}); reinstall tinyddpm") from None
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    if images.dtype != np.uint8 or labels.dtype != np.uint8 or digest != EMBEDDED_SHA256:
        raise DataError(f"{resource}: embedded MNIST subset fails its SHA-256 check; reinstall tinyddpm")
    return MNIST(images, labels.astype(np.int64), EMBEDDED_SOURCE)


def _offline():
    return os.environ.get("TINYDDPM_OFFLINE", "") not in ("", "0")


def load_mnist(split="train", root=None, download=True):
    """MNIST ``split`` ("train": 60,000 images, "test": 10,000) from the first source that has it:

    1. IDX files (.gz or raw) in ``root``, then ``$TINYDDPM_DATA``, then ``~/.cache/tinyddpm/mnist``;
    2. a download from ``MIRRORS`` into that cache (skipped if ``download`` is false or
       ``TINYDDPM_OFFLINE=1``);
    3. for "train" only, the embedded subset of the first 10,000 training images.

    Every file is checked against its SHA-256; the returned ``source`` says which one was used.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown MNIST split {split!r}: expected 'train' or 'test'")
    if root is not None and not Path(root).is_dir():
        raise DataError(f"{root}: no such data directory")
    searched = [Path(d) for d in (root, os.environ.get("TINYDDPM_DATA")) if d] + [_cache_dir()]
    for directory in searched:
        if all(_find(directory, name) for name in _file_names(split)):
            mnist = load_idx_dir(directory, split)
            break
    else:
        may_download = download and not _offline()
        mnist = _download_pair(split, _cache_dir()) if may_download else None
        if mnist is None and split == "train":
            mnist = _load_embedded()
        if mnist is None:
            where = ", ".join(map(str, searched))
            why = "no mirror could be reached" if may_download else "downloading is off"
            raise DataError(f"no MNIST {split} files in {where} and {why} "
                            "(the embedded subset covers only the training split)")
    logger.info("MNIST %s: %d images from %s", split, len(mnist.images), mnist.source)
    return mnist


def mean_pool(x, size):
    """(N, C, H, H) → (N, C, size, size) by averaging k×k blocks, k = H/size (x itself when size = H).
    Lets a smaller U-Net (the `sim` preset) train on MNIST."""
    n, c, h, w = x.shape
    if h == size == w:
        return x
    if h != w or h % size:
        raise ValueError(f"cannot mean-pool {h}×{w} images to {size}×{size}: {size} must divide {h}")
    k = h // size
    return x.reshape(n, c, size, k, size, k).mean(axis=(3, 5), dtype=np.float32)


def to_model_range(images):
    """uint8 images (N, H, W) in [0, 255] -> float32 (N, 1, H, W) in [-1, 1]: x = u / 127.5 - 1, the
    data scaling of Ho et al. (2020), Sec. 3.3, so the prior N(0, I) and the data share a scale."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    x = images[:, None].astype(np.float32)  # the one copy; the rest is in place
    x /= 127.5  # 255 / 127.5 is exactly 2, so the ends map to exactly -1 and 1
    x -= 1.0
    return x


def from_model_range(x):
    """Model-range images x (any shape, ~[-1, 1]) -> uint8 u = clip(round((x + 1) * 127.5), 0, 255),
    the inverse of ``to_model_range`` (exact on its outputs)."""
    u = (np.asarray(x) + 1.0) * 127.5
    np.rint(u, out=u)
    np.clip(u, 0, 255, out=u)
    return u.astype(np.uint8)
