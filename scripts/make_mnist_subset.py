"""Build tinyddpm/assets/mnist_subset.npz, the embedded MNIST subset that lets ``tinyddpm train`` run
offline: the first 10,000 training images and labels, unchanged (uint8), in a compressed .npz that
loads without pickle, with the provenance and licence note stored beside the arrays.

    python scripts/make_mnist_subset.py SOURCE_DIR [--out PATH]

SOURCE_DIR holds the MNIST training IDX files (any spelling tinyddpm.data accepts); they are
verified by SHA-256 before anything is written. Prints the SHA-256 that tinyddpm.data.EMBEDDED_SHA256
must hold for the new file.
"""
import argparse
import hashlib
import os
import sys

import numpy as np

from tinyddpm import data

COUNT = 10_000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICE_PATH = os.path.join(REPO, "tinyddpm", "assets", "MNIST_SUBSET_NOTICE.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_dir", help="directory with train-images-idx3-ubyte(.gz) and its labels")
    parser.add_argument("--out", default=os.path.join(REPO, "tinyddpm", data.EMBEDDED_SUBSET))
    args = parser.parse_args(argv)

    mnist = data.load_idx_dir(args.source_dir, "train")
    images = np.ascontiguousarray(mnist.images[:COUNT])
    labels = mnist.labels[:COUNT].astype(np.uint8)  # digits 0-9: the IDX file's own dtype
    with open(NOTICE_PATH, encoding="utf-8") as f:
        notice = f.read()
    # The notice travels inside the .npz too (a 0-d unicode array, no pickle needed), so the licence
    # stays with the data wherever the file is copied.
    np.savez_compressed(args.out, images=images, labels=labels, notice=np.array(notice))
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    print(f"wrote {args.out}: {len(images)} images from {mnist.source}; EMBEDDED_SHA256 = {digest}")


if __name__ == "__main__":
    sys.exit(main())
