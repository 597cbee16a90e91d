"""Person videos (JHMDB, VIP): an articulated, textured 2-D puppet with the 15 JHMDB joints and the VIP
part classes, its actions, forward kinematics and drawing, and a scene of puppets over a panning
photograph."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stt.data.synthetic.layers import (
    Background,
    Light,
    Sprite,
    apply_light,
    box_around,
    box_grid,
    draw_sprite,
    paint,
    random_background,
    random_light,
    random_sprite,
    random_tint,
    render_background,
)
from stt.data.synthetic.numerics import PHOTOGRAPHS, cos_sin, to_uint8, wave
from stt.data.synthetic.presets import SyntheticPreset

JHMDB_JOINTS = (
    "neck",
    "belly",
    "face",
    "right_shoulder",
    "left_shoulder",
    "right_hip",
    "left_hip",
    "right_elbow",
    "left_elbow",
    "right_knee",
    "left_knee",
    "right_wrist",
    "left_wrist",
    "right_ankle",
    "left_ankle",
)
JHMDB_ACTIONS = ("clap", "jump", "walk", "wave")
VIP_CLASSES = (
    "background",
    "hat",
    "hair",
    "glove",
    "sunglasses",
    "upper-clothes",
    "dress",
    "coat",
    "socks",
    "pants",
    "torso-skin",
    "scarf",
    "skirt",
    "face",
    "left-arm",
    "right-arm",
    "left-leg",
    "right-leg",
    "left-shoe",
    "right-shoe",
)


@dataclass(frozen=True)
class Puppet:
    """A 2-D person facing the camera: person's left is image right. Angles in radians; a limb angle is
    measured from hanging straight down, positive away from the body."""

    size: float  # torso length, pixels
    centre: tuple[float, float]  # mid-point of the belly's path
    path: tuple[tuple[float, float, float], tuple[float, float, float]]  # x and y waves of the belly
    waves: dict[str, tuple[float, float, float, float]]  # joint angle -> base, amplitude, frequency, phase
    looks: dict[str, tuple[str, tuple[float, float, float], float, float]]  # part group -> texture, tint, origin


# (VIP class, from-joint, to-joint, radius / torso length, look), drawn in this order
_PARTS = (
    ("pants", "right_hip", "left_hip", 0.2, "pants"),
    ("pants", "right_hip", "right_knee", 0.14, "pants"),
    ("pants", "left_hip", "left_knee", 0.14, "pants"),
    ("right-leg", "right_knee", "right_ankle", 0.1, "skin"),
    ("left-leg", "left_knee", "left_ankle", 0.1, "skin"),
    ("right-shoe", "right_ankle", "right_toe", 0.08, "shoes"),
    ("left-shoe", "left_ankle", "left_toe", 0.08, "shoes"),
    ("upper-clothes", "belly", "neck", 0.3, "clothes"),
    ("right-arm", "right_shoulder", "right_elbow", 0.09, "skin"),
    ("right-arm", "right_elbow", "right_wrist", 0.08, "skin"),
    ("left-arm", "left_shoulder", "left_elbow", 0.09, "skin"),
    ("left-arm", "left_elbow", "left_wrist", 0.08, "skin"),
    ("hair", "hair", "hair", 0.27, "hair"),  # a disc behind the face shows as a rim of hair
    ("face", "chin", "face", 0.22, "skin"),
)

# Joint-angle waves per action: (base, amplitude, cycles per video, phase); "root_x" and "root_y" move the
# belly (amplitude in torso lengths).
_ACTIONS = {
    "clap": {
        "shoulder_r": (0.5, 0.25, 3, 0),
        "shoulder_l": (0.5, 0.25, 3, 0),
        "elbow_r": (-1.9, 0.6, 3, 0),
        "elbow_l": (-1.9, 0.6, 3, 0),
        "root_x": (0, 0.3, 0.5, 0),
    },
    "jump": {
        "shoulder_r": (1.5, 1.1, 2, 0),
        "shoulder_l": (1.5, 1.1, 2, 0),
        "knee_r": (-0.4, 0.4, 2, 0),
        "knee_l": (-0.4, 0.4, 2, 0),
        "hip_r": (0.2, 0.15, 2, 0),
        "hip_l": (0.2, 0.15, 2, 0),
        "root_y": (0, 0.35, 1, 0),
    },
    "walk": {
        "hip_r": (0.05, 0.4, 2, 0),
        "hip_l": (0.05, 0.4, 2, 3.14),
        "knee_r": (-0.2, 0.2, 2, 1),
        "knee_l": (-0.2, 0.2, 2, 4.1),
        "shoulder_r": (0.15, 0.3, 2, 3.14),
        "shoulder_l": (0.15, 0.3, 2, 0),
        "root_x": (0, 1.2, 0.5, 0),
    },
    "wave": {
        "shoulder_r": (2.4, 0.25, 2, 0),
        "elbow_r": (0.5, 0.6, 4, 0),
        "shoulder_l": (0.2, 0.1, 1, 0),
        "root_x": (0, 0.3, 0.5, 0),
    },
}
# The resting angle of every joint an action leaves alone.
DEFAULT_ANGLES = {
    "tilt": 0.0,
    "shoulder_r": 0.2,
    "shoulder_l": 0.2,
    "elbow_r": 0.1,
    "elbow_l": 0.1,
    "hip_r": 0.12,
    "hip_l": 0.12,
    "knee_r": 0.0,
    "knee_l": 0.0,
}


def random_puppet(
    rng: np.random.Generator,
    action: str,
    shape: tuple[int, int],
    frames: int,
    textures: dict[str, np.ndarray],
    size: float,
    slot: tuple[float, float],
) -> Puppet:
    """A puppet doing `action` (one of JHMDB_ACTIONS), its belly at a random x within `slot` (fractions
    of the width), with random clothes."""
    height, width = shape
    waves = {name: (base, 0.0, 0.0, 0.0) for name, base in DEFAULT_ANGLES.items()}
    waves["tilt"] = (0.0, 0.12, 2.0 * math.pi / frames, float(rng.uniform(0, 2 * math.pi)))
    for name, (base, amplitude, cycles, phase) in _ACTIONS[action].items():
        jitter = rng.uniform(0.8, 1.2)
        waves[name] = (base, amplitude * jitter, 2.0 * math.pi * cycles / frames, phase + rng.uniform(-0.3, 0.3))
    root_x, root_y = waves.pop("root_x", (0, 0, 0, 0)), waves.pop("root_y", (0, 0, 0, 0))
    path = ((root_x[1] * size, root_x[2], root_x[3]), (abs(root_y[1]) * size, root_y[2], root_y[3]))
    centre = (float(rng.uniform(*slot) * width), float(height * 0.5 + size * rng.uniform(0.0, 0.3)))
    looks = {}
    for group in ("pants", "skin", "shoes", "clothes", "hair"):
        texture = str(rng.choice(PHOTOGRAPHS))
        source_height, source_width = textures[texture].shape[:2]
        tint = random_tint(rng, texture)
        if group == "skin":
            tint = tuple(c * s for c, s in zip(tint, (1.1, 0.85, 0.7)))
        if group == "hair":
            tint = tuple(c * 0.45 for c in tint)
        looks[group] = (
            texture,
            tint,
            float(rng.uniform(0.3, 0.7) * source_width),
            float(rng.uniform(0.3, 0.7) * source_height),
        )
    return Puppet(size=size, centre=centre, path=path, waves=waves, looks=looks)


def puppet_joints(puppet: Puppet, t: float) -> dict[str, np.ndarray]:
    """Forward kinematics at time t: joint name -> (x, y) pixels; the 15 JHMDB joints plus the helper
    points 'hair', 'chin', 'right_toe', 'left_toe' used for drawing."""
    angle = {
        name: base + wave(amplitude, frequency, phase, t)
        for name, (base, amplitude, frequency, phase) in puppet.waves.items()
    }
    size = puppet.size
    belly = np.array(
        [puppet.centre[0] + wave(*puppet.path[0], t), puppet.centre[1] - abs(wave(*puppet.path[1], t))]
    )  # jumps go up
    cos, sin = cos_sin(angle["tilt"])
    up, side = np.array([sin, -cos]), np.array([cos, sin])  # side points to the person's left

    def limb(start: np.ndarray, outward: np.ndarray, radians: float, length: float) -> np.ndarray:
        c, s = cos_sin(radians)
        return start + (-up * c + outward * s) * length

    joints = {"belly": belly, "neck": belly + up * size, "face": belly + up * (size * 1.45)}
    joints["chin"] = joints["face"] - up * (size * 0.05)
    joints["hair"] = joints["face"] + up * (size * 0.08)
    pelvis = belly - up * (size * 0.25)
    for name, sign in (("right", -1.0), ("left", 1.0)):
        outward = side * sign
        key = name[0]
        shoulder = joints["neck"] + outward * (size * 0.38) - up * (size * 0.08)
        elbow = limb(shoulder, outward, angle[f"shoulder_{key}"], size * 0.5)
        wrist = limb(elbow, outward, angle[f"shoulder_{key}"] + angle[f"elbow_{key}"], size * 0.45)
        hip = pelvis + outward * (size * 0.2)
        knee = limb(hip, outward, angle[f"hip_{key}"], size * 0.6)
        ankle = limb(knee, outward, angle[f"hip_{key}"] + angle[f"knee_{key}"], size * 0.55)
        joints.update(
            {
                f"{name}_shoulder": shoulder,
                f"{name}_elbow": elbow,
                f"{name}_wrist": wrist,
                f"{name}_hip": hip,
                f"{name}_knee": knee,
                f"{name}_ankle": ankle,
                f"{name}_toe": ankle + outward * (size * 0.15) - up * (size * 0.04),
            }
        )
    return joints


def _draw_capsule(
    canvas: np.ndarray,
    labels: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    radius: float,
    look: tuple,
    label: int,
    textures: dict[str, np.ndarray],
) -> None:
    """A segment with round caps, its texture fixed to the segment (moves and turns with it)."""
    axis = end - start
    length = math.sqrt(float(axis @ axis))
    middle = (start + end) / 2.0
    box = box_around(float(middle[0]), float(middle[1]), length / 2.0 + radius + 2.0, labels.shape)
    if box is None:
        return
    column, row = box_grid(box)
    dx, dy = column - start[0], row - start[1]
    if length > 0.0:
        direction_x, direction_y = float(axis[0]) / length, float(axis[1]) / length
    else:
        direction_x, direction_y = 0.0, 1.0
    along = dx * direction_x + dy * direction_y
    across = dy * direction_x - dx * direction_y
    beyond = along - np.clip(along, 0.0, length)  # past either end, the cap is a circle
    distance = radius - np.sqrt(beyond * beyond + across * across)
    texture, tint, origin_x, origin_y = look
    paint(canvas, labels, box, distance, textures[texture], tint, origin_x + across, origin_y + along, label)


def draw_puppet(
    canvas: np.ndarray, labels: np.ndarray, puppet: Puppet, t: float, textures: dict[str, np.ndarray]
) -> np.ndarray:
    """Draw the puppet at time t with VIP class labels (in place); returns its 15 x 2 JHMDB joints (x, y)."""
    joints = puppet_joints(puppet, t)
    for part, start, end, radius, look in _PARTS:
        _draw_capsule(
            canvas,
            labels,
            joints[start],
            joints[end],
            radius * puppet.size,
            puppet.looks[look],
            VIP_CLASSES.index(part),
            textures,
        )
    return np.stack([joints[name] for name in JHMDB_JOINTS])


@dataclass(frozen=True)
class PuppetScene:
    """One person video: drawn back to front, background, distractor blobs, puppets, then light."""

    shape: tuple[int, int]
    frames: int
    background: Background
    distractors: tuple[Sprite, ...]
    puppets: tuple[Puppet, ...]
    light: Light
    jpeg_quality: int


def random_puppet_scene(
    rng: np.random.Generator,
    preset: SyntheticPreset,
    shape: tuple[int, int],
    frames: int,
    people: int,
    textures: dict[str, np.ndarray],
    action: str | None = None,
) -> PuppetScene:
    """`people` puppets (the first doing `action`, others random) over a panning photograph, behind them
    background blobs."""
    size = shape[0] * 0.24 / math.sqrt(people)
    puppets = []
    for k in range(people):
        doing = action if (action and k == 0) else str(rng.choice(JHMDB_ACTIONS))
        slot = ((k + 0.35) / people, (k + 0.65) / people)  # side by side, not on top of each other
        puppets.append(random_puppet(rng, doing, shape, frames, textures, size * rng.uniform(0.85, 1.1), slot))
    distractors = []
    for _ in range(int(rng.integers(0, preset.distractors + 1))):
        texture = str(rng.choice(PHOTOGRAPHS))
        distractors.append(
            random_sprite(rng, preset, shape, frames, textures, 0, texture, random_tint(rng, texture), "any")
        )
    return PuppetScene(
        shape=shape,
        frames=frames,
        background=random_background(rng, preset, shape, textures),
        distractors=tuple(distractors),
        puppets=tuple(puppets),
        light=random_light(rng, preset, frames),
        jpeg_quality=int(rng.integers(preset.jpeg_quality[0], preset.jpeg_quality[1] + 1)),
    )


def render_puppet_frame(
    scene: PuppetScene, t: int, textures: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame t: (H x W x 3 uint8 image, H x W uint8 VIP classes, people x 15 x 2 joints (x, y), 0-based)."""
    canvas = render_background(scene.background, t, scene.frames, scene.shape, textures)
    labels = np.zeros(scene.shape, dtype=np.uint8)
    for sprite in scene.distractors:
        draw_sprite(canvas, labels, sprite, t, textures)
    joints = np.stack([draw_puppet(canvas, labels, puppet, t, textures) for puppet in scene.puppets])
    return to_uint8(apply_light(canvas, scene.light, t)), labels, joints
