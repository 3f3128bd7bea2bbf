"""The image path: encoded bytes -> decoded, resized and centre-cropped pixels -> patches.

Runs in the loader's worker processes (numpy and Pillow only, no torch), so decoding overlaps the
training step. Pixels stay uint8 until the model's patch stem scales them.
"""

from __future__ import annotations

import io

import numpy as np

from kiln.errors import DataError


def decode(data: bytes, size: int, channels: int, where: str = "an image") -> np.ndarray:
    """Encoded image -> uint8 (size, size, channels): the centre square of the image with its
    shorter side resized to `size` (antialiased bilinear, computed for the square only; a JPEG
    much larger than `size` is first decoded at a reduced scale, which its format allows)."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data)) as src:
            if src.format == "JPEG":
                src.draft(mode, (size, size))  # decodes at 1/2, 1/4 or 1/8 scale while that stays >= size
            im = src.convert(mode)
            w, h = im.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            if side != size or w != h:
                im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise DataError(f"{where} cannot be decoded as an image ({e})") from None
    return pixels.reshape(size, size, channels)


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p * p * C): patches in row-major order, each flattened (row, col, channel)."""
    h, w, c = pixels.shape
    grid = pixels.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape((h // patch) * (w // patch), patch * patch * c)


def image_problem(data: bytes) -> str | None:
    """Why Pillow cannot decode these bytes in full (unknown format, truncated, a decompression
    bomb), or None: checked while preparing, so training never meets an undecodable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        return str(e) or type(e).__name__
    return None
