"""Print the calibration table of `tinyddpm eval` (docs/quality.md): the shipped judge's scores of real MNIST
training images and of deliberately damaged copies of them, against its reference statistics (the
10,000 held-out training images), at n = 1,000 and n = 10,000, so a user can read a score.

    python scripts/calibrate_judge.py [--data-dir DIR] [--samples SAMPLES.npz ...]

The real images are the first 10,000 training images (from DIR, else wherever tinyddpm.data finds
MNIST, the embedded subset included). Each --samples file (from `tinyddpm sample --npz`) adds a row.
Deterministic: every random draw comes from one generator seeded with 0.
"""
import argparse
import os
import sys

import numpy as np

from tinyddpm import data, evaluation

SIZES = (1_000, 10_000)
BLUR_SIGMA = 1.0  # pixels


def add_gaussian_noise(images, sigma, rng):
    """x + σ·ε with x in [0, 1] pixel units, ε ~ N(0, 1), clipped back to [0, 1]."""
    noisy = images / 255.0 + sigma * rng.standard_normal(images.shape)
    return np.rint(np.clip(noisy, 0, 1) * 255).astype(np.uint8)


def gaussian_blur(images, sigma):
    """Separable Gaussian blur: a 1-D kernel g(k) ∝ exp(−k²/2σ²), |k| ≤ 3σ, along rows then columns,
    with zero (background) padding."""
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    x = np.pad(images.astype(np.float64), ((0, 0), (radius, radius), (radius, radius)))
    h, w = images.shape[1:]
    x = sum(weight * x[:, :, radius + k:radius + k + w] for k, weight in zip(offsets, kernel))
    x = sum(weight * x[:, radius + k:radius + k + h, :] for k, weight in zip(offsets, kernel))
    return np.rint(x).astype(np.uint8)


def uniform_noise(count, rng):
    """Images of independent uniform pixels in 0–255: no digit at all."""
    return rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def table_rows(name, images, labels, judge, reference, sizes):
    for n in sizes:
        result = evaluation.evaluate(images[:n], None if labels is None else labels[:n], judge, reference)
        accuracy = "–" if result.accuracy is None else f"{result.accuracy:.1%}"
        yield (f"| {name} | {n:,} | {result.fid:.2f} | {accuracy} | {result.confidence:.3f} "
               f"| {result.class_entropy:.3f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="directory with the MNIST training IDX files")
    parser.add_argument("--samples", action="append", default=[], help="a `tinyddpm sample --npz` file")
    args = parser.parse_args(argv)

    judge, reference = evaluation.load_judge()
    mnist = data.load_mnist("train", root=args.data_dir)
    count = max(SIZES)
    if len(mnist.images) < count:
        parser.error(f"need {count:,} training images, {mnist.source} has {len(mnist.images):,}")
    images, labels = mnist.images[:count], mnist.labels[:count]
    rng = np.random.default_rng(0)
    conditions = [
        ("real training images", images, labels),
        ("+ Gaussian noise σ = 0.1", add_gaussian_noise(images, 0.1, rng), labels),
        ("+ Gaussian noise σ = 0.3", add_gaussian_noise(images, 0.3, rng), labels),
        (f"Gaussian blur σ = {BLUR_SIGMA:g} px", gaussian_blur(images, BLUR_SIGMA), labels),
        ("uniform noise images", uniform_noise(count, rng), None),
    ]
    print(f"Reference: {reference.n:,} held-out MNIST training images (the judge never saw them); "
          f"real images: the first {count:,} of {mnist.source}.\n")
    print("| images | n | classifier FID | accuracy | confidence | class entropy (ln 10 = 2.303) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, condition_images, condition_labels in conditions:
        for row in table_rows(name, condition_images, condition_labels, judge, reference, SIZES):
            print(row, flush=True)
    for path in args.samples:
        sample_images, sample_labels = evaluation.load_samples(path)
        for row in table_rows(f"samples: {os.path.basename(path)}", sample_images, sample_labels, judge,
                              reference, (len(sample_images),)):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
