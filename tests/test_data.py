"""MNIST loading: IDX parsing (.gz and raw), bad files, checksums, the search order, the verified
download (against a local HTTP server), the embedded subset, and the model-range scaling.
Synthetic IDX files only; HOME, the environment and the mirror list are isolated in every test."""
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis.extra import numpy as hnp

from tinyddpm import data

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def idx_bytes(array, magic=None):
    """The IDX encoding of a uint8 array: magic 00 00 08 ndim, big-endian uint32 sizes, the data."""
    magic = 0x0800 + array.ndim if magic is None else magic
    return magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()


def write_files(directory, files, gz=True, dotted=False):
    """Write {canonical name: IDX bytes} into ``directory`` as .gz or raw, in either spelling."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, content in files.items():
        path = directory / ((name.replace("-idx", ".idx") if dotted else name) + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(content) if gz else content)
        paths[name] = path
    return paths


def trust(monkeypatch, files):
    """Put the SHA-256 of synthetic files in the checksum table, as the real ones are."""
    for name, content in files.items():
        monkeypatch.setitem(data.SHA256, name, hashlib.sha256(content).hexdigest())


def synthetic(n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    return images, labels, {IMAGES: idx_bytes(images), LABELS: idx_bytes(labels)}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the real cache, the caller's environment or the network."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TINYDDPM_DATA", raising=False)
    monkeypatch.delenv("TINYDDPM_OFFLINE", raising=False)
    monkeypatch.setattr(data, "MIRRORS", ())
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 5)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "home" / ".cache" / "tinyddpm" / "mnist"


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 (a free port) serving tmp_path/www from a daemon thread, stopped
    after the test; yields (base URL, served directory, list of requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep pytest's output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/", root, requested
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# ---- IDX files on disk ----

@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("dotted", [False, True], ids=["dash", "dot"])
def test_reads_idx_files_gz_or_raw_in_either_spelling(tmp_path, monkeypatch, gz, dotted):
    images, labels, files = synthetic()
    trust(monkeypatch, files)
    paths = write_files(tmp_path / "d", files, gz=gz, dotted=dotted)
    mnist = data.load_mnist("train", root=tmp_path / "d")
    assert mnist.images.dtype == np.uint8 and mnist.images.shape == (3, 28, 28)
    assert mnist.labels.dtype == np.int64 and mnist.labels.shape == (3,)
    np.testing.assert_array_equal(mnist.images, images)
    np.testing.assert_array_equal(mnist.labels, labels)
    assert mnist.source == str(paths[IMAGES])


def test_batch_of_one_and_the_test_split(tmp_path, monkeypatch):
    images, labels, train_files = synthetic(n=1)
    files = {name.replace("train", "t10k"): content for name, content in train_files.items()}
    trust(monkeypatch, files)
    write_files(tmp_path / "d", files)
    mnist = data.load_mnist("test", root=tmp_path / "d")
    np.testing.assert_array_equal(mnist.images, images)
    np.testing.assert_array_equal(mnist.labels, labels)


@pytest.mark.parametrize("which, magic", [(IMAGES, 0x00000801), (LABELS, 0x00000803), (IMAGES, 0x12345678)])
def test_wrong_magic_number_names_the_file(tmp_path, monkeypatch, which, magic):
    images, labels, files = synthetic()
    files[which] = idx_bytes(images if which == IMAGES else labels, magic=magic)
    trust(monkeypatch, files)  # so the magic number, not the checksum, is what fails
    paths = write_files(tmp_path / "d", files, gz=False)
    with pytest.raises(data.DataError, match=rf"{paths[which]}: magic number 0x{magic:08x}"):
        data.load_mnist(root=tmp_path / "d")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:10], r"truncated \(10 bytes"),                 # inside the header
    (lambda b: b[:-1], r"truncated \(header says 3x28x28"),       # inside the pixels
    (lambda b: b + b"\0", r"has trailing bytes"),
])
def test_truncated_or_overlong_idx(tmp_path, monkeypatch, damage, message):
    *_, files = synthetic()
    files[IMAGES] = damage(files[IMAGES])
    trust(monkeypatch, files)
    paths = write_files(tmp_path / "d", files, gz=False)
    with pytest.raises(data.DataError, match=rf"{paths[IMAGES]}: {message}"):
        data.load_mnist(root=tmp_path / "d")


def test_truncated_gzip(tmp_path, monkeypatch):
    *_, files = synthetic()
    trust(monkeypatch, files)
    paths = write_files(tmp_path / "d", files)
    paths[LABELS].write_bytes(paths[LABELS].read_bytes()[:-12])
    with pytest.raises(data.DataError, match=rf"{paths[LABELS]}: corrupt or truncated gzip"):
        data.load_mnist(root=tmp_path / "d")


def test_checksum_mismatch_names_the_file(tmp_path, monkeypatch):
    *_, files = synthetic()
    trust(monkeypatch, files)
    files[IMAGES] = files[IMAGES][:-1] + bytes([files[IMAGES][-1] ^ 1])  # one pixel, one bit
    paths = write_files(tmp_path / "d", files)
    with pytest.raises(data.DataError, match=rf"{paths[IMAGES]}: SHA-256 mismatch"):
        data.load_mnist(root=tmp_path / "d")


def test_untrusted_files_fail_the_real_checksums(tmp_path):
    *_, files = synthetic()
    write_files(tmp_path / "d", files)
    with pytest.raises(data.DataError, match="SHA-256 mismatch"):
        data.load_mnist(root=tmp_path / "d")


def test_search_order_root_then_env_then_cache(tmp_path, monkeypatch, cache):
    *_, files = synthetic()
    trust(monkeypatch, files)
    root = write_files(tmp_path / "root", files)
    env = write_files(tmp_path / "env", files)
    cached = write_files(cache, files)
    monkeypatch.setenv("TINYDDPM_DATA", str(tmp_path / "env"))
    assert data.load_mnist(root=tmp_path / "root").source == str(root[IMAGES])
    (tmp_path / "empty").mkdir()  # a root without the files falls through to $TINYDDPM_DATA
    assert data.load_mnist(root=tmp_path / "empty").source == str(env[IMAGES])
    assert data.load_mnist().source == str(env[IMAGES])
    monkeypatch.delenv("TINYDDPM_DATA")
    assert data.load_mnist().source == str(cached[IMAGES])


def test_a_missing_root_directory_is_an_error(tmp_path):
    with pytest.raises(data.DataError, match="no such data directory"):
        data.load_mnist(root=tmp_path / "nope")


def test_unknown_split():
    with pytest.raises(data.DataError, match="unknown MNIST split 'val'"):
        data.load_mnist("val")


# ---- download ----

def test_download_skips_a_404_mirror_verifies_and_caches(server, monkeypatch, cache):
    base, www, requested = server
    *_, files = synthetic()
    trust(monkeypatch, files)
    write_files(www / "good", files)
    monkeypatch.setattr(data, "MIRRORS", (base + "missing/", base + "good/"))
    mnist = data.load_mnist()
    assert mnist.source == base + f"good/{IMAGES}.gz"
    assert requested == [f"/missing/{IMAGES}.gz", f"/good/{IMAGES}.gz", f"/missing/{LABELS}.gz", f"/good/{LABELS}.gz"]
    assert sorted(p.name for p in cache.iterdir()) == [f"{IMAGES}.gz", f"{LABELS}.gz"]  # no temp files left
    again = data.load_mnist()  # now served from the cache, no new request
    assert again.source == str(cache / f"{IMAGES}.gz") and len(requested) == 4
    np.testing.assert_array_equal(again.images, mnist.images)


def test_a_corrupt_download_is_a_checksum_error_and_never_cached(server, monkeypatch, cache):
    base, www, _ = server
    *_, files = synthetic()
    trust(monkeypatch, files)
    files[IMAGES] = files[IMAGES][:-1] + b"\x42"
    write_files(www, files)
    monkeypatch.setattr(data, "MIRRORS", (base,))
    with pytest.raises(data.DataError, match=rf"{base}{IMAGES}.gz: SHA-256 mismatch"):
        data.load_mnist()
    assert list(cache.iterdir()) == []


def test_unreachable_mirrors_fall_back_to_the_embedded_subset(server, monkeypatch):
    base, _, requested = server
    monkeypatch.setattr(data, "MIRRORS", (base + "missing/", "http://127.0.0.1:1/"))  # 404, refused
    assert data.load_mnist().source == data.EMBEDDED_SOURCE
    assert requested == [f"/missing/{IMAGES}.gz"]


# ---- the embedded subset ----

@pytest.mark.parametrize("offline_env, download", [(True, True), (False, False)],
                         ids=["TINYDDPM_OFFLINE=1", "download=False"])
def test_offline_uses_the_embedded_subset_without_the_network(server, monkeypatch, offline_env, download):
    base, _, requested = server
    monkeypatch.setattr(data, "MIRRORS", (base,))
    if offline_env:
        monkeypatch.setenv("TINYDDPM_OFFLINE", "1")
    mnist = data.load_mnist("train", download=download)
    assert requested == []
    assert mnist.source == "embedded subset (10,000 images)"
    assert mnist.images.dtype == np.uint8 and mnist.images.shape == (10_000, 28, 28)
    assert mnist.labels.dtype == np.int64 and mnist.labels.shape == (10_000,)
    assert np.array_equal(np.unique(mnist.labels), np.arange(10))  # every digit, nothing else
    assert mnist.images.min() == 0 and mnist.images.max() == 255


def test_the_test_split_has_no_embedded_fallback(monkeypatch):
    monkeypatch.setenv("TINYDDPM_OFFLINE", "1")
    with pytest.raises(data.DataError, match="no MNIST test files .* downloading is off .*only the training split"):
        data.load_mnist("test")


# ---- model range ----

@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, max_side=6)))
def test_to_model_range_scales_into_minus_one_one_and_back(images):
    x = data.to_model_range(images)
    assert x.dtype == np.float32 and x.shape == (images.shape[0], 1, *images.shape[1:]) and x.flags.c_contiguous
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_allclose(x[:, 0], images / 127.5 - 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data.from_model_range(x)[:, 0], images)


def test_model_range_end_points_are_exact():
    x = data.to_model_range(np.array([[[0, 255]]], np.uint8))
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 0, 1] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_model_range_rounds_and_clips(dtype):
    x = np.array([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 7.0], dtype)
    np.testing.assert_array_equal(data.from_model_range(x), [0, 0, 0, 128, 191, 255, 255])
    assert data.from_model_range(x).dtype == np.uint8


def test_to_model_range_wants_uint8_images():
    with pytest.raises(ValueError, match="expected uint8 images"):
        data.to_model_range(np.zeros((2, 28, 28), np.float32))


def test_mean_pool_averages_blocks_and_rejects_sizes_that_do_not_divide():
    x = np.arange(2 * 1 * 28 * 28, dtype=np.float32).reshape(2, 1, 28, 28)
    pooled = data.mean_pool(x, 7)
    assert pooled.shape == (2, 1, 7, 7) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled[1, 0, 2, 3], x[1, 0, 8:12, 12:16].mean(), rtol=1e-6)
    assert data.mean_pool(x, 28) is x
    with pytest.raises(ValueError, match="must divide"):
        data.mean_pool(x, 8)
