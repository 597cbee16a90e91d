"""MoCo v2's augmentation for the spatial stage: two independently augmented views of one image.

Recipe of MoCo v2 (Chen et al. 2020, `aug_plus`): RandomResizedCrop(scale 0.2-1), colour jitter
(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2, Gaussian blur (sigma 0.1-2) with p 0.5,
horizontal flip, ImageNet normalisation. Built from torchvision.transforms.v2, so PIL images and
tensors (3 x H x W; uint8, or float in [0, 1]) are accepted alike.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torch import Tensor

from stt.color import IMAGENET_MEAN, IMAGENET_STD


def blur_kernel_size(image_size: int) -> int:
    """An odd kernel of about 10% of the image side (SimCLR's choice; MoCo v2 blurs with PIL,
    which sizes its kernel from sigma): 23 at 224. Sigma <= 2 makes anything wider irrelevant."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def moco_v2_colour(image_size: int) -> list[v2.Transform]:
    """MoCo v2's colour augmentation: jitter with p 0.8, grayscale with p 0.2, blur with p 0.5."""
    return [
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5),
    ]


def seeded(generator: torch.Generator | None, draw):
    """draw() with torch's global generator seeded from `generator` inside a forked copy of its state,
    so the result depends only on `generator` and the caller's global state is left untouched
    (None: draw() from the global state itself)."""
    if generator is None:
        return draw()
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return draw()


def moco_v2_transform(image_size: int) -> v2.Compose:
    """One random MoCo v2 view: PIL image or tensor in, 3 x S x S normalised float32 out."""
    if image_size <= 0:
        raise ValueError(f"spatial.image_size: expected a positive size, got {image_size!r}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            *moco_v2_colour(image_size),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoViews:
    """Two independent draws of a transform on one image: the query and the key view.

    torchvision's transforms draw from torch's global generator; given a `generator`, the call
    seeds a forked copy of that state from it, so results depend only on the generator and the
    caller's global random state is left untouched.
    """

    def __init__(self, image_size: int):
        self.transform = moco_v2_transform(image_size)

    def __call__(self, image: Image.Image | Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if isinstance(image, Image.Image):
            image = image.convert("RGB")  # image folders hold grayscale and CMYK JPEGs too
        elif image.ndim < 3 or image.shape[-3] != 3:
            raise ValueError(f"expected an RGB image tensor (... x 3 x H x W), got shape {tuple(image.shape)}")
        return seeded(generator, lambda: (self.transform(image), self.transform(image)))


def vfs_transform(image_size: int, scale: tuple[float, float] = (0.2, 1.0), color: bool = False) -> v2.Compose:
    """One VFS frame view (paper 003, the authors' train_pipeline; stt.vfs): a random resized crop
    (area `scale`, aspect 3/4-4/3) squashed to image_size x image_size, a horizontal flip with p 0.5,
    with `color` also MoCo v2's jitter, grayscale and blur; ImageNet-normalised float32 out."""
    if image_size <= 0:
        raise ValueError(f"vfs.image_size: expected a positive size, got {image_size!r}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            *(moco_v2_colour(image_size) if color else []),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class FramePairViews:
    """VFS's two views: two frames of one video (3 x H x W each), each through its own draw of
    `vfs_transform`; random state handled as `TwoViews` (a generator seeds a forked copy)."""

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.2, 1.0), color: bool = False):
        self.transform = vfs_transform(image_size, scale, color)

    def __call__(
        self, first: Tensor, second: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return seeded(generator, lambda: (self.transform(first), self.transform(second)))
