"""Files: the four official layouts (DAVIS-2017, YouTube-VOS, JHMDB, VIP) written from the scenes, and
the encoders behind them (JPEG, PNG, MAT, text lists) with fixed settings and no timestamps, so the
bytes depend on the seed alone (and the pinned pillow and scikit-image versions)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from stt.data.layouts import davis_palette
from stt.data.synthetic.numerics import video_rng
from stt.data.synthetic.presets import SyntheticPreset
from stt.data.synthetic.puppet import JHMDB_ACTIONS, random_puppet_scene, render_puppet_frame
from stt.data.synthetic.scenes import random_object_scene, relabel_by_appearance, render_object_frame

KINDS = ("davis", "ytvos", "jhmdb", "vip")
KIND_DIRS = {"davis": "davis", "ytvos": "youtube-vos", "jhmdb": "jhmdb", "vip": "vip"}
# YouTube-VOS-style category of an object, by the photograph its texture is cut from.
_CATEGORIES = {
    "astronaut": "person",
    "chelsea": "cat",
    "coffee": "others",
    "immunohistochemistry": "others",
    "motorcycle": "motorbike",
    "brick": "others",
    "camera": "person",
    "coins": "others",
    "grass": "others",
    "gravel": "others",
    "moon": "others",
}


# ----------------------------------------------------------------------------------------------------
# Encoders


def _write_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """The H x W x 3 uint8 image after one JPEG encoding at `quality` and decoding."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _write_png(path: Path, image: np.ndarray, palette: list[int] | None = None) -> None:
    """Pillow writes no tIME chunk; the compression level is fixed so the bytes are too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.fromarray(image)
    if palette is not None:
        png.putpalette(palette)  # turns the 'L' image into 'P'
    png.save(path, "PNG", optimize=False, compress_level=6)


def write_mat(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """scipy.io.savemat stamps the creation time into the 116-byte text header; write a fixed one."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, arrays, format="5", do_compression=False)
    data = bytearray(buffer.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, written by stt.data.synthetic".ljust(116, b" ")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------------------------------
# The four layouts


def write_davis(root: Path, preset: SyntheticPreset, seed: int, textures: dict[str, np.ndarray]) -> None:
    """<root>/JPEGImages/480p/<seq>/00000.jpg, Annotations/480p/<seq>/00000.png, ImageSets/2017/<split>.txt.
    Every other sequence has an object that enters after frame 0 (it gets the next id)."""
    palette = davis_palette()
    for split, count in (("val", preset.davis_val), ("train", preset.davis_train)):
        names = []
        for index in range(count):
            name = f"{split}-{index:02d}"
            shape = (preset.davis_height, preset.davis_widths[index % len(preset.davis_widths)])
            scene = random_object_scene(
                video_rng(seed, f"davis-{split}", index), preset, shape, preset.davis_frames, index % 2 == 1, textures
            )
            masks = []
            for t in range(scene.frames):
                image, mask = render_object_frame(scene, t, textures)
                _write_jpeg(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", image, scene.jpeg_quality)
                masks.append(mask)
            for t, mask in enumerate(relabel_by_appearance(masks)[0]):
                _write_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", mask, palette)
            names.append(name)
        _write_lines(root / "ImageSets" / "2017" / f"{split}.txt", names)


def write_ytvos(root: Path, preset: SyntheticPreset, seed: int, textures: dict[str, np.ndarray]) -> None:
    """<root>/train/{JPEGImages,Annotations}/<vid>/<frame>.{jpg,png} and train/meta.json. Frames are named
    by raw frame number, every 5th, from a random start; the motion is per listed frame."""
    palette = davis_palette()
    train = root / "train"
    videos = {}
    for index in range(preset.ytvos_videos):
        rng = video_rng(seed, "ytvos", index)
        video = "".join(f"{d:x}" for d in rng.integers(0, 16, size=10))
        start = 5 * int(rng.integers(0, 12))
        stems = [f"{start + 5 * i:05d}" for i in range(preset.ytvos_frames)]
        scene = random_object_scene(rng, preset, preset.ytvos_size, preset.ytvos_frames, index % 3 == 2, textures)
        masks = []
        for t, stem in enumerate(stems):
            image, mask = render_object_frame(scene, t, textures)
            _write_jpeg(train / "JPEGImages" / video / f"{stem}.jpg", image, scene.jpeg_quality)
            masks.append(mask)
        masks, old_ids = relabel_by_appearance(masks)
        texture_of = {sprite.label: sprite.texture for sprite in scene.sprites if sprite.label}
        objects = {}
        for stem, mask in zip(stems, masks):
            _write_png(train / "Annotations" / video / f"{stem}.png", mask, palette)
            for object_id in np.unique(mask)[1:]:
                objects.setdefault(int(object_id), []).append(stem)
        videos[video] = {
            "objects": {
                str(object_id): {"category": _CATEGORIES[texture_of[old_ids[object_id - 1]]], "frames": frames}
                for object_id, frames in sorted(objects.items())
            }
        }
    train.mkdir(parents=True, exist_ok=True)
    (train / "meta.json").write_text(json.dumps({"videos": videos}, indent=1, sort_keys=True) + "\n")


def write_jhmdb(root: Path, preset: SyntheticPreset, seed: int, textures: dict[str, np.ndarray]) -> None:
    """<root>/Rename_Images/<action>/<video>/00001.png, joint_positions/<action>/<video>/joint_positions.mat
    (pos_img: 2 x 15 x T, MATLAB 1-based pixels) and splits/<action>_test_split1.txt ('<video>.avi 1' train,
    '... 2' test). Frames went through JPEG once, as the real ones did."""
    index = 0
    for action in JHMDB_ACTIONS:
        split_lines = []
        for number in range(preset.jhmdb_videos):
            video = f"synthetic_{action}_{number:02d}"
            scene = random_puppet_scene(
                video_rng(seed, "jhmdb", index), preset, preset.jhmdb_size, preset.jhmdb_frames, 1, textures, action
            )
            index += 1
            positions = []
            for t in range(scene.frames):
                image, _, joints = render_puppet_frame(scene, t, textures)
                image = _jpeg_round_trip(image, scene.jpeg_quality)
                _write_png(root / "Rename_Images" / action / video / f"{t + 1:05d}.png", image)
                positions.append(joints[0] + 1.0)  # MATLAB pixel coordinates start at 1
            pos_img = np.stack(positions, axis=2).transpose(1, 0, 2)  # 2 x 15 x T
            write_mat(root / "joint_positions" / action / video / "joint_positions.mat", {"pos_img": pos_img})
            split_lines.append(f"{video}.avi {2 if number >= preset.jhmdb_videos // 2 else 1}")
        _write_lines(root / "splits" / f"{action}_test_split1.txt", split_lines)


def write_vip(root: Path, preset: SyntheticPreset, seed: int, textures: dict[str, np.ndarray]) -> None:
    """<root>/VIP_Fine/Images/videos<N>/<12-digit frame, from 1>.jpg, Annotations/Category_ids/videos<N>/
    <stem>.png (mode 'L', VIP classes) on frames 1, 26, 51, ... and lists/{val,train}_videos.txt."""
    fine = root / "VIP_Fine"
    number = 1
    for split, count in (("val", preset.vip_val), ("train", preset.vip_train)):
        names = []
        for index in range(count):
            name = f"videos{number}"
            number += 1
            rng = video_rng(seed, f"vip-{split}", index)
            scene = random_puppet_scene(
                rng, preset, preset.vip_size, preset.vip_frames, 1 + int(rng.integers(0, 2)), textures
            )
            for t in range(scene.frames):
                image, classes, _ = render_puppet_frame(scene, t, textures)
                stem = f"{t + 1:012d}"
                _write_jpeg(fine / "Images" / name / f"{stem}.jpg", image, scene.jpeg_quality)
                if t % 25 == 0:
                    _write_png(fine / "Annotations" / "Category_ids" / name / f"{stem}.png", classes)
            names.append(name)
        _write_lines(fine / "lists" / f"{split}_videos.txt", names)


# kind -> its writer; each writes one dataset root for (preset, seed) from the loaded photographs
WRITERS = {"davis": write_davis, "ytvos": write_ytvos, "jhmdb": write_jhmdb, "vip": write_vip}
