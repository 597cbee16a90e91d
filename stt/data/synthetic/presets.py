"""The synthetic sets' sizes and difficulty: `SyntheticPreset` and the named presets (tiny, default, hard)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticPreset:
    """Sizes and difficulty of one synthetic set. Sizes are (height, width) in pixels."""

    # DAVIS-2017: val and train sequences, every frame annotated
    davis_height: int
    davis_widths: tuple[int, ...]  # cycled over sequences; an odd width catches off-by-one resizing
    davis_val: int
    davis_train: int
    davis_frames: int
    # YouTube-VOS train: listed (every 5th raw) frames per video
    ytvos_videos: int
    ytvos_frames: int
    ytvos_size: tuple[int, int]
    # JHMDB: videos per action (the first half train, the rest test)
    jhmdb_videos: int
    jhmdb_frames: int
    jhmdb_size: tuple[int, int]
    # VIP: videos, frames per video (every 25th annotated, starting with the first)
    vip_val: int
    vip_train: int
    vip_frames: int
    vip_size: tuple[int, int]
    # difficulty of the object videos
    max_objects: int  # objects visible in the first frame, at most
    object_size: float  # object radius / frame height
    distractors: int  # look-alikes per video, at most
    motion: float  # amplitude of an object's path / frame size
    spin: float  # rotation, radians per frame, at most
    scale_change: float  # relative amplitude of the size oscillation
    deform: float  # amplitude of the bending and rippling warps
    exit_fraction: float  # share of objects whose path leaves the frame and comes back
    occluder: float  # probability that a bar sweeps across a video
    illumination: float  # relative amplitude of the gain oscillation
    pan: float  # background pan over a video / the room the photograph leaves
    jpeg_quality: tuple[int, int]  # drawn per video, inclusive


# Difficulty, DAVIS val, seed 0. Copying the first mask, mean J over the objects of frame 0 and frames
# 1..T-2 (tests/test_synthetic.py::copy_first_mask_j): tiny 0.24, default 0.30, hard 0.12.
# Lab-pixel propagation (`python -m stt.evaluate davis --checkpoint lab:4`), default: J 0.70.
PRESETS: dict[str, SyntheticPreset] = {
    "tiny": SyntheticPreset(
        davis_height=64,
        davis_widths=(97, 112, 85),
        davis_val=2,
        davis_train=1,
        davis_frames=8,
        ytvos_videos=3,
        ytvos_frames=5,
        ytvos_size=(64, 96),
        jhmdb_videos=2,
        jhmdb_frames=6,
        jhmdb_size=(64, 80),
        vip_val=1,
        vip_train=1,
        vip_frames=27,
        vip_size=(64, 80),
        max_objects=2,
        object_size=0.2,
        distractors=1,
        motion=0.15,
        spin=0.03,
        scale_change=0.15,
        deform=0.15,
        exit_fraction=0.0,
        occluder=0.5,
        illumination=0.1,
        pan=0.5,
        jpeg_quality=(80, 90),
    ),
    "default": SyntheticPreset(
        davis_height=240,
        davis_widths=(345, 427, 320, 384, 400, 360),
        davis_val=6,
        davis_train=6,
        davis_frames=30,
        ytvos_videos=60,
        ytvos_frames=20,
        ytvos_size=(192, 320),
        jhmdb_videos=2,
        jhmdb_frames=24,
        jhmdb_size=(240, 320),
        vip_val=3,
        vip_train=2,
        vip_frames=51,
        vip_size=(256, 320),
        max_objects=3,
        object_size=0.16,
        distractors=2,
        motion=0.09,
        spin=0.03,
        scale_change=0.2,
        deform=0.15,
        exit_fraction=0.15,
        occluder=0.5,
        illumination=0.12,
        pan=0.6,
        jpeg_quality=(80, 90),
    ),
    "hard": SyntheticPreset(
        davis_height=240,
        davis_widths=(345, 427, 320, 384, 400, 360),
        davis_val=8,
        davis_train=6,
        davis_frames=50,
        ytvos_videos=80,
        ytvos_frames=24,
        ytvos_size=(192, 320),
        jhmdb_videos=3,
        jhmdb_frames=32,
        jhmdb_size=(240, 320),
        vip_val=4,
        vip_train=2,
        vip_frames=76,
        vip_size=(256, 320),
        max_objects=3,
        object_size=0.13,
        distractors=4,
        motion=0.15,
        spin=0.06,
        scale_change=0.3,
        deform=0.25,
        exit_fraction=0.4,
        occluder=1.0,
        illumination=0.2,
        pan=1.0,
        jpeg_quality=(75, 85),
    ),
}
