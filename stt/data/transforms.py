"""Per-sample transforms of the temporal stage, as plain numpy/torch functions (no Ray).

A training pair is two frames of one video, cropped by the SAME random resized crop and flipped
by the SAME coin, so that a pixel of the target and the pixel at the same place in the reference
show (nearly) the same scene point; the encoder learns correspondence from that (DESIGN.md,
"Temporal stage").

Crop convention: torchvision's `RandomResizedCrop` — `scale` bounds the crop's AREA as a fraction
of the frame's, `ratio` bounds its aspect WIDTH / HEIGHT, drawn log-uniformly; ten tries, then a
centre crop clamped to `ratio`. With ratio (1.5, 2) the crops are landscape, about the shape of a
16:9 video frame (1.78), and are squashed to a square `crop_size`, as MAST resizes whole frames to
256 x 256. (A portrait reading, height / width in 1.5-2, could not even fit 60% of a 16:9 frame.)
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageFile


class CropBox(NamedTuple):
    """A crop in pixels of a frame: rows top:top+height, columns left:left+width."""

    top: int
    left: int
    height: int
    width: int


def decode_rgb_or_none(data: bytes) -> np.ndarray | None:
    """JPEG (or any PIL-readable) bytes -> (H, W, 3) uint8 RGB, or None if empty, corrupt or truncated.

    PIL is used rather than cv2.imdecode because libjpeg via cv2 pads a truncated file with grey
    and reports success; PIL raises, as long as LOAD_TRUNCATED_IMAGES stays False.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated frames would be decoded silently")
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> CropBox:
    """torchvision's `RandomResizedCrop.get_params`, drawn from a numpy generator (see module doc)."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"data.crop_scale: expected 0 < low <= high <= 1, got {scale!r}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"data.crop_ratio: expected 0 < low <= high (width / height), got {ratio!r}")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return CropBox(top, left, crop_h, crop_w)
    # Fallback: the largest centred crop whose aspect lies within `ratio`.
    frame_ratio = width / height
    if frame_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif frame_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)


def crop_resize(image: np.ndarray, box: CropBox, size: int, flip: bool) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: `box` cut out, resized, mirrored left-right if `flip`."""
    patch = image[box.top : box.top + box.height, box.left : box.left + box.width]
    # Bilinear (torchvision's choice) reads every source pixel while shrinking by up to 2x, so it
    # does not alias there, and costs 1/8 of area averaging; beyond 2x only averaging is faithful.
    shrink = max(box.height, box.width) / size
    interpolation = cv2.INTER_AREA if shrink > 2 else cv2.INTER_LINEAR
    patch = cv2.resize(patch, (size, size), interpolation=interpolation)
    return cv2.flip(patch, 1) if flip else patch


def pair_crops(
    target: np.ndarray,
    reference: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """One random resized crop and one horizontal-flip coin, applied to both frames.

    target, reference: (H, W, 3) uint8 frames of one video. A reference whose size differs from
    the target's (never in the official datasets) is first resized to it, so the box means the
    same place in both. Returns two (size, size, 3) uint8 arrays.
    """
    height, width = target.shape[:2]
    if reference.shape[:2] != (height, width):
        reference = cv2.resize(reference, (width, height), interpolation=cv2.INTER_AREA)
    box = random_resized_crop_box(rng, height, width, scale, ratio)
    flip = bool(rng.random() < 0.5)
    return crop_resize(target, box, size, flip), crop_resize(reference, box, size, flip)


def to_chw(images: np.ndarray) -> np.ndarray:
    """N x H x W x 3 -> N x 3 x H x W (a contiguous copy, the layout torch models take)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
