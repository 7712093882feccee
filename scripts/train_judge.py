"""Re-create tinyddpm/assets/judge.npz: the judge CNN of tinyddpm.evaluation, trained with tinyddpm's own
engine and Adam on the first 50,000 MNIST training images, plus the mean and covariance of its
features over the last 10,000 (which it never trains on).

    python scripts/train_judge.py MNIST_DIR [--max-epochs 3] [--seed 0] [--out PATH]

MNIST_DIR holds the training IDX files (any spelling tinyddpm.data accepts, verified by SHA-256).
Training stops after the first epoch whose held-out accuracy reaches 98.5% (the held-out images decide
only when to stop, never a gradient); the weights are written only if that target is met. Prints the
accuracy and the wall time. Deterministic for a given seed (same shuffles, same initialisation).
"""
import argparse
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from tinyddpm import checkpoint, data, evaluation, optim
from tinyddpm import functional as F
from tinyddpm import random as _random
from tinyddpm.tensor import Tensor

BATCH_SIZE = 128
LEARNING_RATE = 1e-3
TARGET_ACCURACY = 0.985


def accuracy(judge, images, labels):
    _, probs = evaluation.judge_outputs(judge, images)
    return float((probs.argmax(axis=1) == labels).mean())


def train_epoch(judge, opt, x, labels, rng, desc):
    """One pass over (x, labels) in a fresh random order, minimising the cross-entropy."""
    order = rng.permutation(len(x))
    bar = tqdm(range(0, len(x), BATCH_SIZE), desc=desc, unit="batch", dynamic_ncols=True)
    for start in bar:
        batch = order[start:start + BATCH_SIZE]
        loss = F.cross_entropy(judge(Tensor(x[batch])), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mnist_dir", help="directory with train-images-idx3-ubyte(.gz) and its labels")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=evaluation.JUDGE_PATH)
    args = parser.parse_args(argv)
    if args.max_epochs < 1:
        parser.error("--max-epochs must be at least 1")

    mnist = data.load_idx_dir(args.mnist_dir, "train")
    train_size = evaluation.TRAIN_SIZE
    x_train = data.to_model_range(mnist.images[:train_size])
    y_train = mnist.labels[:train_size]
    held_out, held_out_labels = evaluation.held_out(mnist)

    _random.manual_seed(args.seed)                 # the layers' initialisation
    rng = np.random.default_rng(args.seed)          # the shuffles
    judge = evaluation.Judge()
    opt = optim.Adam(judge.parameters(), lr=LEARNING_RATE)
    start = time.perf_counter()
    for epoch in range(1, args.max_epochs + 1):
        train_epoch(judge, opt, x_train, y_train, rng, desc=f"epoch {epoch}/{args.max_epochs}")
        held_out_accuracy = accuracy(judge, held_out, held_out_labels)
        print(f"epoch {epoch}: held-out accuracy {held_out_accuracy:.2%} "
              f"({time.perf_counter() - start:.0f} s so far)", flush=True)
        if held_out_accuracy >= TARGET_ACCURACY:
            break
    elapsed = time.perf_counter() - start

    if held_out_accuracy < TARGET_ACCURACY:
        print(f"held-out accuracy {held_out_accuracy:.2%} is below the {TARGET_ACCURACY:.1%} target: "
              f"{args.out} not written", file=sys.stderr)
        return 1
    reference = evaluation.reference_statistics(judge, held_out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    checkpoint.save(args.out, {
        "format": evaluation.JUDGE_FORMAT,
        "model": judge.state_dict(),
        "reference": {"mean": reference.mean, "cov": reference.cov, "n": reference.n},
        "held_out_accuracy": held_out_accuracy, "epochs": epoch, "seed": args.seed,
    })
    print(f"held-out accuracy {held_out_accuracy:.2%} on {len(held_out):,} images after {epoch} epochs "
          f"({elapsed:.0f} s on {len(x_train):,} images); wrote {args.out} "
          f"({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
