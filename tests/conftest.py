import os

# numba picks the real CUDA driver or its CPU simulator when numba.cuda is first imported:
# the test suite always simulates (no GPU here). PTX compilation runs in a subprocess without it.
if os.environ.get("TINYDDPM_TEST_DEVICE") != "cuda":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No real cache and never the network: MNIST comes from the embedded subset."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TINYDDPM_OFFLINE", "1")
    monkeypatch.delenv("TINYDDPM_DATA", raising=False)
