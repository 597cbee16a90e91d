"""Lab colour for the temporal stage: conversion, normalisation and the colour-channel bottleneck.

The temporal stage feeds the encoder Lab frames with one colour channel removed and asks it to
reconstruct that channel from the other frame (paper 001, Sec. 4.1; MAST). Conventions follow
the authors' code (and MAST, which it copies):

- Lab is CIE L*a*b* of sRGB under D65 / 2 degrees, L in [0, 100], a and b in about [-128, 127],
  exactly `skimage.color.rgb2lab`; it is normalised with mean (50, 0, 0), std (50, 127, 127).
- One of a/b (the same one in both frames of a pair) is zeroed in the *normalised* frame, i.e.
  set to neutral grey, and the whole frame is multiplied by 1.5 = 3 / (3 - 1), the
  `nn.Dropout2d` rescaling for one dropped channel out of three. This scales L and the kept
  colour channel alike (`a *= 3 / (3 - drop_ch_num)` on the 3-channel frame in both codes).
- The reconstruction target is the dropped channel of the *unmodified* normalised target frame
  (not zeroed, not rescaled), and the values that are copied are the same channel of the
  unmodified normalised reference frame: both codes clone the Lab frames before the dropout.
"""

from __future__ import annotations

import torch
from torch import Tensor

# sRGB (linear) -> CIE XYZ and the D65 / 2-degree white point, as in skimage.color.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)
_LAB_MEAN = (50.0, 0.0, 0.0)
_LAB_STD = (50.0, 127.0, 127.0)
# The RGB input's normalisation (torchvision's ImageNet statistics), here beside Lab's so every input
# space stt feeds an encoder is defined in one file.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLOR_CHANNELS = (1, 2)  # a and b: the channels that may be dropped


def _check_image(x: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected a B x 3 x H x W tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] (B x 3 x H x W) -> CIE Lab (B x 3 x H x W, float32), as skimage.color.rgb2lab.

    Computed channel by channel with elementwise ops, so bf16 autocast never lowers its precision.
    """
    _check_image(rgb, "rgb")
    rgb = rgb.float() if rgb.dtype in (torch.float16, torch.bfloat16) else rgb
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    r, g, b = linear.unbind(1)
    xyz = [(m0 * r + m1 * g + m2 * b) / white for (m0, m1, m2), white in zip(_XYZ_FROM_RGB, _D65_WHITE)]
    # CIE's cube root with its linear toe near black; the clamp keeps pow away from negatives.
    fx, fy, fz = (
        torch.where(t > 0.008856, t.clamp_min(0.008856).pow(1.0 / 3.0), 7.787 * t + 16.0 / 116.0) for t in xyz
    )
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def imagenet_normalize(rgb: Tensor) -> Tensor:
    """B x 3 x H x W RGB in [0, 1] -> the spatial stage's (and so the teacher's) input."""
    mean = rgb.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = rgb.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


def normalize_lab(lab: Tensor) -> Tensor:
    """Lab (B x 3 x H x W) -> (Lab - (50, 0, 0)) / (50, 127, 127): L and a/b roughly in [-1, 1]."""
    _check_image(lab, "lab")
    mean = lab.new_tensor(_LAB_MEAN).view(1, 3, 1, 1)
    std = lab.new_tensor(_LAB_STD).view(1, 3, 1, 1)
    return (lab - mean) / std


def drop_color_channel(
    lab_t: Tensor, lab_r: Tensor, generator: torch.Generator | None = None, scale: float = 1.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Zero one of a/b per sample in both frames and rescale what is left (see module doc).

    lab_t, lab_r: B x 3 x H x W normalised Lab (target and reference frame).
    generator: the random source of the per-sample choice (None: torch's global one); it may live
    on the CPU whatever the frames' device.
    Returns (input_t, input_r, target_channel_index): the encoder inputs, B x 3 x H x W each
    (new tensors; the arguments are not modified), and the dropped channel per sample, a B int64
    tensor of 1 (a) or 2 (b) on the frames' device. The reconstruction target is that channel of
    the unmodified `lab_t` (see `take_channel`).
    """
    _check_image(lab_t, "lab_t")
    _check_image(lab_r, "lab_r")
    if lab_t.shape != lab_r.shape:
        raise ValueError(f"lab_t and lab_r: expected the same shape, got {tuple(lab_t.shape)} and {tuple(lab_r.shape)}")
    batch = lab_t.shape[0]
    generator_device = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.randint(len(COLOR_CHANNELS), (batch,), generator=generator, device=generator_device)
    dropped = (drawn + COLOR_CHANNELS[0]).to(lab_t.device)
    channel_ids = torch.arange(3, device=lab_t.device).view(1, 3, 1, 1)
    keep = (channel_ids != dropped.view(batch, 1, 1, 1)).to(lab_t.dtype) * scale  # B x 3 x 1 x 1
    return lab_t * keep, lab_r * keep, dropped


def take_channel(lab: Tensor, channel_index: Tensor) -> Tensor:
    """One channel per sample: lab B x 3 x H x W, channel_index B (int64) -> B x 1 x H x W."""
    _check_image(lab, "lab")
    if channel_index.shape != (lab.shape[0],):
        raise ValueError(f"channel_index: expected shape ({lab.shape[0]},), got {tuple(channel_index.shape)}")
    index = channel_index.view(-1, 1, 1, 1).expand(-1, 1, *lab.shape[2:])
    return lab.gather(1, index)
