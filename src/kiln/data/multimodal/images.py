"""The image path: encoded bytes -> decoded, resized and centre-cropped pixels -> patches.

Runs in the loader's worker processes (numpy and Pillow only, no torch), so decoding overlaps the
training step. Pixels stay uint8 until the model's patch stem scales them.
"""

from __future__ import annotations

import io

import numpy as np

from kiln.errors import DataError


def decode(data: bytes, size: int, channels: int, where: str = "an image") -> np.ndarray:
    """Encoded image -> uint8 (size, size, channels): the shorter side resized to `size`
    (bicubic; Pillow's reducing filter when shrinking a lot), then the centre square cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            scale = size / min(w, h)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            if new != (w, h):
                im = im.resize(new, Image.Resampling.BICUBIC, reducing_gap=2.0 if scale < 0.5 else None)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where} cannot be decoded as an image ({e})") from None
    return pixels.reshape(size, size, channels)


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p * p * C): patches in row-major order, each flattened (row, col, channel)."""
    h, w, c = pixels.shape
    grid = pixels.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape((h // patch) * (w // patch), patch * patch * c)


def image_size_of(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when the bytes are no image Pillow knows."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None
