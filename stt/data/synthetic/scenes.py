"""Object videos (DAVIS, YouTube-VOS): a random scene of textured objects, look-alike distractors, an
occluder and a light over a panning photograph; its frames and object masks; ids renumbered by
appearance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stt.data.synthetic.layers import (
    Background,
    Light,
    Occluder,
    Sprite,
    apply_light,
    draw_occluder,
    draw_sprite,
    random_background,
    random_light,
    random_occluder,
    random_sprite,
    random_tint,
    render_background,
)
from stt.data.synthetic.numerics import PHOTOGRAPHS, to_uint8
from stt.data.synthetic.presets import SyntheticPreset


@dataclass(frozen=True)
class ObjectScene:
    """One object video: drawn back to front, background, distractors, objects, occluder, then light."""

    shape: tuple[int, int]
    frames: int
    background: Background
    sprites: tuple[Sprite, ...]
    occluder: Occluder | None
    light: Light
    jpeg_quality: int


def random_object_scene(
    rng: np.random.Generator,
    preset: SyntheticPreset,
    shape: tuple[int, int],
    frames: int,
    late_object: bool,
    textures: dict[str, np.ndarray],
) -> ObjectScene:
    """Objects 1..k visible in frame 0 (k <= preset.max_objects) and, with `late_object`, one more
    entering later; look-alike distractors share an object's texture and colour."""
    initial = int(rng.integers(1, preset.max_objects + 1))
    if late_object and initial == preset.max_objects:
        initial = max(1, initial - 1)  # 1-3 objects in all
    sources = rng.permutation(np.array(PHOTOGRAPHS))
    looks = [(str(source), random_tint(rng, str(source))) for source in sources[: initial + late_object]]
    objects = [random_sprite(rng, preset, shape, frames, textures, k + 1, *looks[k], "start") for k in range(initial)]
    if late_object:
        objects.append(random_sprite(rng, preset, shape, frames, textures, initial + 1, *looks[initial], "late"))
    distractors = [
        random_sprite(rng, preset, shape, frames, textures, 0, *looks[int(rng.integers(len(looks)))], "any")
        for _ in range(int(rng.integers(0, preset.distractors + 1)))
    ]
    occluder = random_occluder(rng, shape, frames, textures) if rng.uniform() < preset.occluder else None
    return ObjectScene(
        shape=shape,
        frames=frames,
        background=random_background(rng, preset, shape, textures),
        sprites=tuple(distractors + objects),
        occluder=occluder,
        light=random_light(rng, preset, frames),
        jpeg_quality=int(rng.integers(preset.jpeg_quality[0], preset.jpeg_quality[1] + 1)),
    )


def render_object_frame(scene: ObjectScene, t: int, textures: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Frame t of an object video: (H x W x 3 uint8 image, H x W uint8 object ids, 0 = background)."""
    canvas = render_background(scene.background, t, scene.frames, scene.shape, textures)
    labels = np.zeros(scene.shape, dtype=np.uint8)
    for sprite in scene.sprites:
        draw_sprite(canvas, labels, sprite, t, textures)
    if scene.occluder is not None:
        draw_occluder(canvas, labels, scene.occluder, t, textures)
    return to_uint8(apply_light(canvas, scene.light, t)), labels


def relabel_by_appearance(masks: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Renumber object ids 1..n in order of first appearance (ties: by old id), so the ids present in
    frame 0 are exactly 1..k: the DAVIS evaluator counts the objects of a sequence as frame 0's largest id.
    Objects never visible vanish. Returns the new masks and the old ids in new order."""
    order: list[int] = []
    for mask in masks:
        order += [int(i) for i in np.unique(mask) if i != 0 and i not in order]
    lookup = np.zeros(256, dtype=np.uint8)
    for new, old in enumerate(order, start=1):
        lookup[old] = new
    return [lookup[mask] for mask in masks], order
