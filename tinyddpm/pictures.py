"""PNG output: sample grids side by side and a trajectory strip (Pillow), the loss curve (matplotlib)."""
import os
import tempfile

import numpy as np
from PIL import Image


def grid(images, ncols, pad=2, scale=2):
    """Tile uint8 images (N, H, W) into one picture, ``ncols`` per row, white gutters."""
    n, h, w = images.shape
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    picture = Image.fromarray(canvas, mode="L")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def side_by_side(left, right, gap=12):
    """Two grayscale pictures next to each other on white, ``gap`` pixels apart (e.g. EMA | raw samples)."""
    canvas = Image.new("L", (left.width + gap + right.width, max(left.height, right.height)), 255)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def smoothed(values, beta=0.98):
    """Bias-corrected exponential moving average (as Adam's moments): s_i = β s_{i−1} + (1 − β) v_i from
    s_{−1} = 0, divided by 1 − β^(i+1), so the curve starts on the data instead of lagging behind it."""
    values = np.asarray(values, dtype=np.float64)
    out, s = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        s = beta * s + (1 - beta) * v
        out[i] = s / (1 - beta ** (i + 1))
    return out


def loss_curve(losses, evals=()):
    """The training loss per step (light) and its bias-corrected moving average (dark) against the step,
    log-scaled y with ticks; with evaluations [(step, cFID, accuracy), ...] (`train --eval-every`) a
    second panel below: cFID (left axis) and accuracy (right axis). Drawn with matplotlib's Agg backend
    (no display needed)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    losses = np.maximum(np.asarray(losses, dtype=np.float64), 1e-8)
    evals = np.asarray(evals, dtype=np.float64).reshape(-1, 3)
    panels = 2 if len(evals) else 1
    fig, axes = plt.subplots(panels, 1, figsize=(6.4, 3.6 * panels), dpi=100, sharex=True, squeeze=False)
    try:
        ax = axes[0, 0]
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color="#aabee6", linewidth=0.8, label="loss")
        if len(losses):
            ax.plot(steps, smoothed(losses), color="#143ca0", linewidth=1.8,
                    label=f"moving average (β = 0.98), last {smoothed(losses)[-1]:.4f}")
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right")
        if len(evals):
            _eval_panel(axes[1, 0], evals)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _eval_panel(ax, evals):
    """cFID of the EMA model (log y, left) and its accuracy in % (right) at each evaluated step."""
    step, fid, accuracy = evals.T
    ax.plot(step, np.maximum(fid, 1e-3), "o-", color="#b4321e", label="classifier-FID")
    ax.set_yscale("log")
    ax.set_ylabel("classifier-FID (EMA model)", color="#b4321e")
    ax.grid(True, which="both", alpha=0.3)
    right = ax.twinx()
    right.plot(step, 100 * accuracy, "s--", color="#1e7846", label="accuracy")
    right.set_ylabel("accuracy % (EMA model)", color="#1e7846")
    right.set_ylim(0, 100)
    ax.set_title(f"EMA model at each --eval-every step: last cFID {fid[-1]:.1f}, accuracy {100 * accuracy[-1]:.1f}%",
                 fontsize=9)


def save(picture, path):
    """Write a PNG atomically (temp file in the same directory, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
