"""Deterministic numerics of the generator: per-video random streams, rounded waves, uint8 rounding,
bilinear sampling, and the source photographs every texture is cut from.

Same seed, same bytes on every machine: every video draws from its own
`np.random.default_rng([seed, stream, index])` (PCG64 is platform-independent), so it does not depend on
generation order; per-pixel arithmetic is float64 + - * / and sqrt only (IEEE-exact); the few sin/cos of
a frame are rounded to 1e-9 before use; colours are rounded to uint8 explicitly; no cv2 warps.
"""

from __future__ import annotations

import math

import numpy as np
import skimage.data

# Stream ids of the per-video generators; fixed numbers so that videos never depend on each other.
_STREAMS = {"davis-val": 1, "davis-train": 2, "ytvos": 3, "jhmdb": 4, "vip-val": 5, "vip-train": 6}

# Only PNG-backed images: decoding them is exact, whereas JPEG decoders may differ between versions.
COLOUR_SOURCES = ("astronaut", "chelsea", "coffee", "immunohistochemistry", "motorcycle")
GREY_SOURCES = ("brick", "camera", "coins", "grass", "gravel", "moon")
PHOTOGRAPHS = COLOUR_SOURCES + GREY_SOURCES


def video_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of video `index` of `stream` (a key of _STREAMS) for `seed`."""
    return np.random.default_rng([seed, _STREAMS[stream], index])


def wave(amplitude: float, frequency: float, phase: float, t: float) -> float:
    """amplitude * sin(frequency * t + phase), rounded so that libm's last-ulp differences vanish."""
    return round(amplitude * math.sin(frequency * t + phase), 9)


def cos_sin(angle: float) -> tuple[float, float]:
    """(cos, sin) of `angle`, rounded like `wave`."""
    return round(math.cos(angle), 9), round(math.sin(angle), 9)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round half up to uint8, explicitly (no platform-dependent rounding mode in a cast)."""
    return np.floor(np.clip(image, 0.0, 255.0) + 0.5).astype(np.uint8)


def bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample `image` (H x W x C float64) at pixel coordinates x, y (same shape S; pixel centres at
    integers), clamping to the border. Returns S x C float64."""
    height, width = image.shape[:2]
    x = np.clip(x, 0.0, width - 1.0)
    y = np.clip(y, 0.0, height - 1.0)
    x0 = np.minimum(x.astype(np.intp), width - 2)  # truncation is floor here: x >= 0
    y0 = np.minimum(y.astype(np.intp), height - 2)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    # `take` on the flattened image gathers several times faster than 2-D fancy indexing
    pixels = image.reshape(height * width, -1)
    index = y0 * width + x0
    top_left, top_right = pixels.take(index, axis=0), pixels.take(index + 1, axis=0)
    bottom_left, bottom_right = pixels.take(index + width, axis=0), pixels.take(index + width + 1, axis=0)
    top = top_left + fx * (top_right - top_left)
    bottom = bottom_left + fx * (bottom_right - bottom_left)
    return top + fy * (bottom - top)


def _axis_weights(coordinates: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamped coordinates (n,) on an axis of `size` pixels -> (lower pixel index, weight of the upper), both (n,)."""
    coordinates = np.clip(coordinates, 0.0, size - 1.0)
    lower = np.minimum(coordinates.astype(np.intp), size - 2)
    return lower, coordinates - lower


def bilinear_grid(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample `image` (H x W x C float64) on the grid of columns x (w,) and rows y (h,), clamping to the
    border. Returns h x w x C float64. Separable: rows first, then columns, about twice as fast as
    `bilinear` on the same points."""
    height, width = image.shape[:2]
    x0, fx = _axis_weights(x, width)
    y0, fy = _axis_weights(y, height)
    first, last = int(x0.min()), int(x0.max()) + 2
    strip = image[:, first:last]
    upper, lower = strip.take(y0, axis=0), strip.take(y0 + 1, axis=0)
    rows = upper + fy[:, None, None] * (lower - upper)  # h x (last - first) x C
    left, right = rows.take(x0 - first, axis=1), rows.take(x0 - first + 1, axis=1)
    return left + fx[None, :, None] * (right - left)


def load_textures() -> dict[str, np.ndarray]:
    """scikit-image's bundled photographs (no download) as H x W x 3 float64 in [0, 255]."""
    textures = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "immunohistochemistry": skimage.data.immunohistochemistry(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
    }
    for name in GREY_SOURCES:
        grey = getattr(skimage.data, name)()
        textures[name] = np.repeat(grey[..., None], 3, axis=2)
    return {name: image.astype(np.float64) for name, image in textures.items()}
