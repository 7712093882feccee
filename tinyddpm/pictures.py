"""PNG output with Pillow: sample grids, a trajectory strip and the loss curve."""
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw


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


def loss_curve(losses, width=640, height=360, margin=48):
    """The training loss per step (light) and its exponential moving average (dark), log-scaled y."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    losses = np.maximum(np.asarray(losses, dtype=np.float64), 1e-8)
    if len(losses) < 2:
        draw.text((margin, height // 2), "not enough steps for a curve", fill="black")
        return img
    smooth = np.empty_like(losses)
    smooth[0] = losses[0]
    for i in range(1, len(losses)):
        smooth[i] = 0.98 * smooth[i - 1] + 0.02 * losses[i]
    lo, hi = np.log10(losses.min()), np.log10(losses.max())
    hi = hi if hi > lo else lo + 1

    def xy(i, v):
        x = margin + (width - 2 * margin) * i / (len(losses) - 1)
        y = height - margin - (height - 2 * margin) * (np.log10(v) - lo) / (hi - lo)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230))
    draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    draw.text((margin, margin - 16), f"training loss (log scale): {losses.max():.3g} … {losses.min():.3g}", fill="black")
    draw.text((margin, height - margin + 6), f"step 0 … {len(losses)}   last smoothed {smooth[-1]:.4f}", fill="black")
    return img


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
