"""Offline sample-quality evaluation with a small MNIST "judge" classifier.

The judge is a LeNet-style CNN built from tinyddpm's own layers and trained with its own engine
(``scripts/train_judge.py``) on the first 50,000 MNIST training images. Its weights ship in
``assets/judge.npz`` together with the mean and covariance of its penultimate-layer features over the
last 10,000 training images, which it never saw: the reference a set of samples is compared with.

Scores of a set of N images:
  - classifier FID: the Fréchet distance between Gaussians fitted to the judge's features of the
    samples and of the reference (Heusel et al. 2017, with this judge in place of Inception-v3);
  - conditional accuracy: how often the judge names the digit the sampler was asked for;
  - confidence: the mean max-softmax probability (sharp, readable digits score near 1);
  - class entropy: the entropy of the histogram of predicted classes (ln 10 ≈ 2.303 = balanced).
"""
import dataclasses
import math
import os
import zipfile

import numpy as np

from . import checkpoint, data, nn
from . import device as _dev
from . import functional as F
from .tensor import Tensor, no_grad

JUDGE_PATH = os.path.join(os.path.dirname(__file__), "assets", "judge.npz")
JUDGE_FORMAT = "tinyddpm-judge-v1"
TRAIN_SIZE = 50_000       # the judge trains on training images [0, 50,000) ...
HELD_OUT_SIZE = 10_000    # ... and is scored on (and its reference comes from) [50,000, 60,000)
NUM_CLASSES = 10
MAX_ENTROPY = math.log(NUM_CLASSES)  # the class entropy of a perfectly balanced set
IMAGE_SHAPE = (28, 28)


class EvaluationError(ValueError):
    """Images or a samples file the evaluation cannot use (the message names the problem)."""


class Judge(nn.Module):
    """conv 1→16 3×3 → ReLU → max-pool 2 → conv 16→32 3×3 → ReLU → max-pool 2 → linear 1568→128
    (the features) → ReLU → linear 128→10 (LeCun et al. 1998's LeNet shape, with ReLU and max-pooling)."""

    feature_dim = 128

    def __init__(self):
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x):
        """(N, 1, 28, 28) in [−1, 1] → (N, 128): the penultimate layer before its ReLU (dense,
        closer to Gaussian than the rectified values, which matters for a Fréchet distance)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)   # (N, 16, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)   # (N, 32, 7, 7)
        return self.fc1(h.reshape(h.shape[0], -1))

    def classify(self, features):
        """(N, 128) features → (N, 10) logits."""
        return self.fc2(F.relu(features))

    def forward(self, x):
        return self.classify(self.features(x))


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Mean μ (D,) and covariance Σ (D, D), float64, of n feature vectors."""
    mean: np.ndarray
    cov: np.ndarray
    n: int


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The scores of one set of images (see the module docstring)."""
    n: int
    fid: float
    accuracy: float | None    # None when the images carry no labels
    confidence: float
    class_entropy: float


# ---- images ------------------------------------------------------------------------------------
def check_images(images, labels=None):
    """Validate (N, 28, 28) pixel values 0–255 and optional digit labels (N,); return (uint8 images,
    int64 labels or None). All-negative labels (what `tinyddpm sample` writes for an unconditional
    model) mean "no labels"."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise EvaluationError(f"images must have shape (N, 28, 28), got {images.shape}")
    if images.dtype.kind not in "ui":
        raise EvaluationError(f"images must be integer pixel values 0-255 (uint8), got {images.dtype}")
    if len(images) < 2:
        raise EvaluationError(f"need at least 2 images for a covariance, got {len(images)}")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise EvaluationError(f"image values must lie in 0-255, got values in [{low}, {high}]")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "ui":
            raise EvaluationError(f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        if (labels < 0).all():
            labels = None
        elif labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise EvaluationError(f"labels must be digits 0-9, got values in [{labels.min()}, {labels.max()}]")
    return images.astype(np.uint8, copy=False), None if labels is None else labels.astype(np.int64)


def load_samples(path):
    """(images, labels or None) from a .npz written by `tinyddpm sample --npz` (read without pickle)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as e:
        raise EvaluationError(f"cannot read samples file {path!r}: {e.strerror or e}") from None
    except (ValueError, EOFError, zipfile.BadZipFile):  # NumPy takes any other bytes for a (refused) pickle
        raise EvaluationError(f"{path!r} is not an .npz archive (as written by `tinyddpm sample --npz`)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{path!r} is a single .npy array, not an .npz archive with an 'images' array")
    try:
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a damaged or pickled member
        raise EvaluationError(f"samples file {path!r} is damaged or holds pickled objects ({e})") from None
    if "images" not in arrays:
        raise EvaluationError(f"{path!r} has no 'images' array (it holds: {', '.join(arrays) or 'nothing'})")
    return check_images(arrays["images"], arrays.get("labels"))


# ---- the judge ---------------------------------------------------------------------------------
def load_judge(path=JUDGE_PATH):
    """(Judge in eval mode, reference FeatureStatistics) from the shipped weights file."""
    state = checkpoint.load(path)
    if state.get("format") != JUDGE_FORMAT:
        raise checkpoint.CheckpointError(f"{path!r} is not a tinyddpm judge file")
    judge = Judge()
    judge.load_state_dict(state["model"])
    ref = state["reference"]
    return judge.eval(), FeatureStatistics(ref["mean"], ref["cov"], int(ref["n"]))


def judge_outputs(judge, images, batch_size=500):
    """(features float64 (N, 128), softmax probabilities float64 (N, 10)) of uint8 images, in
    batches so memory stays bounded for any N."""
    features = np.empty((len(images), judge.feature_dim))
    probs = np.empty((len(images), NUM_CLASSES))
    with no_grad():
        for start in range(0, len(images), batch_size):
            batch = slice(start, start + batch_size)
            x = _dev.to_device(data.to_model_range(images[batch]))  # the diffusion model's [−1, 1]
            f = judge.features(Tensor(x))
            features[batch] = f.numpy()
            probs[batch] = judge.classify(f).softmax(axis=1).numpy()  # max-subtracted softmax
    return features, probs


# ---- statistics and the Fréchet distance -------------------------------------------------------
def feature_statistics(features):
    """μ = mean of the rows, Σ = (X − μ)ᵀ(X − μ)/(n − 1) (two-pass: centre first, then one GEMM)."""
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    return FeatureStatistics(mean, centred.T @ centred / (len(features) - 1), len(features))


def _sqrt_psd(a):
    """The symmetric square root of a positive semi-definite matrix: V diag(√λ) Vᵀ from a = V diag(λ) Vᵀ
    (eigenvalues clipped at 0: round-off can make a zero eigenvalue slightly negative)."""
    eigenvalues, eigenvectors = np.linalg.eigh(a)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(stats1, stats2):
    """The Fréchet (2-Wasserstein) distance² between N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982):
        d² = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr((Σ₁^½ Σ₂ Σ₁^½)^½),
    in float64 through symmetric eigendecompositions (Σ₁^½ Σ₂ Σ₁^½ is symmetric PSD, so the trace of
    its square root is the sum of the square roots of its eigenvalues)."""
    root1 = _sqrt_psd(stats1.cov)
    middle = root1 @ stats2.cov @ root1
    middle = (middle + middle.T) / 2  # exactly symmetric, as eigvalsh assumes
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum()
    diff = stats1.mean - stats2.mean
    distance = diff @ diff + np.trace(stats1.cov) + np.trace(stats2.cov) - 2 * trace_sqrt
    return max(float(distance), 0.0)  # d² ≥ 0: round-off leaves ~−1e−13 for identical statistics


def class_entropy(predicted):
    """H = −Σ_k p_k ln p_k of the histogram p of predicted classes (0 ln 0 = 0); ln 10 when balanced."""
    p = np.bincount(predicted, minlength=NUM_CLASSES) / len(predicted)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def evaluate(images, labels=None, judge=None, reference=None):
    """Score uint8 images (N, 28, 28) (and the digits they were drawn for) against the reference
    statistics; ``judge``/``reference`` default to the shipped ones (see ``load_judge``)."""
    images, labels = check_images(images, labels)
    if judge is None or reference is None:
        shipped_judge, shipped_reference = load_judge()
        judge = shipped_judge if judge is None else judge
        reference = shipped_reference if reference is None else reference
    features, probs = judge_outputs(judge, images)
    predicted = probs.argmax(axis=1)
    return Evaluation(
        n=len(images),
        fid=frechet_distance(feature_statistics(features), reference),
        accuracy=None if labels is None else float((predicted == labels).mean()),
        confidence=float(probs.max(axis=1).mean()),
        class_entropy=class_entropy(predicted),
    )


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """A guidance w of the accuracy/cFID frontier with its scores; ``interpolated``: read off the straight
    line between two measured w, not measured itself."""
    guidance: float
    fid: float
    accuracy: float
    interpolated: bool


def best_fid_at_accuracy(sweep, min_accuracy=0.99, interpolate=True):
    """The OperatingPoint with the lowest classifier-FID among those whose accuracy is at least
    ``min_accuracy``, from a sweep [(w, Evaluation), ...]; None when none reaches it.

    Guidance buys class fidelity with diversity, so the figure of merit is the least fidelity that is
    enough. Without ``interpolate`` the candidates are the measured w. With it, also each point where the
    accuracy crosses min_accuracy between neighbouring w of the sorted grid, with w and cFID linear in
    the accuracy a between them:  w* = w_i + (a* − a_i)/(a_{i+1} − a_i) · (w_{i+1} − w_i), cFID likewise."""
    rows = sorted((w, r.fid, r.accuracy) for w, r in sweep if r.accuracy is not None)
    candidates = [OperatingPoint(w, fid, accuracy, False) for w, fid, accuracy in rows if accuracy >= min_accuracy]
    if interpolate:
        for (w0, fid0, a0), (w1, fid1, a1) in zip(rows, rows[1:]):
            if (a0 - min_accuracy) * (a1 - min_accuracy) < 0:  # strictly on either side: a crossing
                share = (min_accuracy - a0) / (a1 - a0)
                candidates.append(OperatingPoint(w0 + share * (w1 - w0), fid0 + share * (fid1 - fid0),
                                                 min_accuracy, True))
    return min(candidates, key=lambda p: p.fid, default=None)


def choose_guidance(sweep, min_accuracy=0.99):
    """The measured guidance w of a sweep [(w, Evaluation), ...] with the lowest classifier-FID among those
    whose accuracy is at least ``min_accuracy`` (``best_fid_at_accuracy`` on the grid); None when no w
    reaches it."""
    point = best_fid_at_accuracy(sweep, min_accuracy, interpolate=False)
    return None if point is None else point.guidance


def reference_statistics(judge, images):
    """Feature statistics of real uint8 images (the shipped reference: the 10,000 held-out ones)."""
    features, _ = judge_outputs(judge, check_images(images)[0])
    return feature_statistics(features)


def held_out(mnist):
    """(images, labels) of the training images the judge never saw: the last 10,000 of MNIST's 60,000."""
    rows = slice(TRAIN_SIZE, TRAIN_SIZE + HELD_OUT_SIZE)
    return mnist.images[rows], mnist.labels[rows]
