"""The layers a synthetic frame is composited from, and their random parameters: the panning background
photograph, textured blobs (`Sprite`: objects and look-alike distractors), the sweeping occluder bar, and
the light. Object scenes (scenes.py) and puppet scenes (puppet.py) are built from them.

Each layer computes, inside its bounding box, a signed distance to its outline (pixels, positive inside)
and where in its photograph each pixel samples; `paint` composites it. Labels go to pixels whose centre
is inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stt.data.synthetic.numerics import GREY_SOURCES, PHOTOGRAPHS, bilinear, bilinear_grid, cos_sin, wave
from stt.data.synthetic.presets import SyntheticPreset


def box_around(x: float, y: float, reach: float, shape: tuple[int, int]) -> tuple[slice, slice] | None:
    """Rows and columns within `reach` pixels of (x, y), cut to the frame; None if nothing is left."""
    height, width = shape
    x0, x1 = max(0, math.floor(x - reach)), min(width, math.ceil(x + reach) + 1)
    y0, y1 = max(0, math.floor(y - reach)), min(height, math.ceil(y + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def box_grid(box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of the box: X (1 x w) and Y (h x 1), float64."""
    rows, columns = box
    return (
        np.arange(columns.start, columns.stop, dtype=np.float64)[None, :],
        np.arange(rows.start, rows.stop, dtype=np.float64)[:, None],
    )


def paint(
    canvas: np.ndarray,
    labels: np.ndarray,
    box: tuple[slice, slice],
    distance: np.ndarray,
    texture: np.ndarray,
    tint: tuple[float, float, float],
    source_x: np.ndarray,
    source_y: np.ndarray,
    label: int,
) -> None:
    """Composite a layer into canvas[box] (in place): coverage clip(distance + 0.5, 0, 1) (one pixel of
    anti-aliasing), colour `texture` sampled at (source_x, source_y) times `tint`; all h x w like the box.
    Writes `label` where distance >= 0. Only covered pixels are sampled, the costly part."""
    cover = distance > -0.5
    colour = bilinear(texture, source_x[cover], source_y[cover]) * np.array(tint)
    alpha = np.clip(distance[cover] + 0.5, 0.0, 1.0)[:, None]
    region = canvas[box]
    covered = region[cover]
    region[cover] = covered + alpha * (colour - covered)
    labels[box][distance >= 0] = label


# ----------------------------------------------------------------------------------------------------
# The layers and how each is drawn at time t


@dataclass(frozen=True)
class Background:
    """A tinted photograph panning linearly across the video."""

    texture: str
    tint: tuple[float, float, float]
    zoom: float  # source pixels per frame pixel
    start: tuple[float, float]  # top-left corner in the source, first frame
    end: tuple[float, float]  # ... last frame; the photograph pans linearly in between


def render_background(
    background: Background, t: float, frames: int, shape: tuple[int, int], textures: dict[str, np.ndarray]
) -> np.ndarray:
    """The panning photograph at time t: H x W x 3 float64."""
    progress = t / max(frames - 1, 1)
    left = background.start[0] + (background.end[0] - background.start[0]) * progress
    top = background.start[1] + (background.end[1] - background.start[1]) * progress
    x = left + np.arange(shape[1], dtype=np.float64) * background.zoom
    y = top + np.arange(shape[0], dtype=np.float64) * background.zoom
    return bilinear_grid(textures[background.texture], x, y) * np.array(background.tint)


@dataclass(frozen=True)
class Sprite:
    """A textured blob (union of ellipses) on a smooth path. Local units: multiples of the radius."""

    ellipses: tuple[tuple[float, float, float, float], ...]  # centre u, v and semi-axes a, b
    extent: float  # every ellipse lies within this local distance of the centre
    texture: str
    tint: tuple[float, float, float]
    texture_centre: tuple[float, float]  # source pixel under the sprite's centre
    texture_scale: float  # source pixels per local unit
    label: int  # object id; 0 for distractors
    radius: float  # pixels
    centre: tuple[float, float]  # mid-point of the path
    amplitude: tuple[float, float]  # path: centre + amplitude * sin(frequency * t + phase), per axis
    frequency: tuple[float, float]
    phase: tuple[float, float]
    angle: float
    spin: float
    scale_wave: tuple[float, float, float]  # amplitude, frequency, phase of the relative size change
    bend_wave: tuple[float, float, float]
    ripple_wave: tuple[float, float, float]


def draw_sprite(
    canvas: np.ndarray, labels: np.ndarray, sprite: Sprite, t: float, textures: dict[str, np.ndarray]
) -> None:
    """Paint the sprite at time t into canvas (H x W x 3 float64) and labels (H x W uint8), in place."""
    x = sprite.centre[0] + wave(sprite.amplitude[0], sprite.frequency[0], sprite.phase[0], t)
    y = sprite.centre[1] + wave(sprite.amplitude[1], sprite.frequency[1], sprite.phase[1], t)
    cos, sin = cos_sin(sprite.angle + sprite.spin * t)
    radius = sprite.radius * (1.0 + wave(*sprite.scale_wave, t))
    bend, ripple = wave(*sprite.bend_wave, t), wave(*sprite.ripple_wave, t)
    # A pixel is inside when its warped local coordinates are (|u'|, |v'| <= extent); inverting the warps
    # below bounds how far from the centre that can happen.
    reach_v = sprite.extent + abs(ripple) * 2.0 / 3.0
    reach_u = sprite.extent + abs(bend) * reach_v * reach_v
    box = box_around(x, y, radius * math.sqrt(reach_u * reach_u + reach_v * reach_v) + 2.0, labels.shape)
    if box is None:
        return
    column, row = box_grid(box)
    dx, dy = column - x, row - y
    u = (cos * dx + sin * dy) / radius
    v = (cos * dy - sin * dx) / radius
    u = u + bend * v * v  # bends the sprite into an arc
    clipped = np.clip(u, -1.5, 1.5)
    v = v + ripple * clipped * (1.0 - clipped * clipped / 3.0)  # an S-shaped ripple, |.| <= 2/3
    distance = np.full(u.shape, -np.inf)
    for centre_u, centre_v, a, b in sprite.ellipses:
        du, dv = (u - centre_u) / a, (v - centre_v) / b
        # 1 - q is about 2 * (distance to the outline) / semi-axis near the outline
        distance = np.maximum(distance, (1.0 - (du * du + dv * dv)) * (min(a, b) * radius / 2.0))
    source_x = sprite.texture_centre[0] + u * sprite.texture_scale
    source_y = sprite.texture_centre[1] + v * sprite.texture_scale
    paint(canvas, labels, box, distance, textures[sprite.texture], sprite.tint, source_x, source_y, sprite.label)


@dataclass(frozen=True)
class Occluder:
    """A textured bar, nearly vertical, sweeping from left to right (or back) between two times."""

    texture: str
    tint: tuple[float, float, float]
    origin: tuple[float, float]  # source pixel under the bar's centre
    half_width: float  # pixels
    tilt: float  # radians from vertical
    start: float  # time the bar enters
    end: float  # time it has left
    leftwards: bool


def draw_occluder(
    canvas: np.ndarray, labels: np.ndarray, bar: Occluder, t: float, textures: dict[str, np.ndarray]
) -> None:
    """Paint the bar at time t (label 0: it hides what is behind it), in place; nothing outside its sweep."""
    if not bar.start <= t <= bar.end:
        return
    height, width = labels.shape
    cos, sin = cos_sin(bar.tilt)
    slant = height * abs(sin / cos) / 2.0 + bar.half_width / cos  # horizontal reach of the bar
    progress = (t - bar.start) / (bar.end - bar.start)
    if bar.leftwards:
        progress = 1.0 - progress
    x, y = -slant + progress * (width + 2.0 * slant), height / 2.0
    columns = slice(max(0, math.floor(x - slant)), min(width, math.ceil(x + slant) + 1))
    if columns.start >= columns.stop:
        return
    box = (slice(0, height), columns)
    column, row = box_grid(box)
    across = (column - x) * cos + (row - y) * sin
    along = (row - y) * cos - (column - x) * sin
    distance = bar.half_width - np.abs(across)
    paint(
        canvas, labels, box, distance, textures[bar.texture], bar.tint, bar.origin[0] + across, bar.origin[1] + along, 0
    )


@dataclass(frozen=True)
class Light:
    """Per-frame gain (with a colour cast) and offset: canvas * gain * cast + offset."""

    gain_wave: tuple[float, float, float]
    cast_waves: tuple[tuple[float, float, float], ...]  # one per channel
    offset_wave: tuple[float, float, float]


def apply_light(canvas: np.ndarray, light: Light, t: float) -> np.ndarray:
    """The canvas (H x W x 3 float64) under the light at time t, a new H x W x 3 float64 array."""
    gain = 1.0 + wave(*light.gain_wave, t)
    scale = np.array([gain * (1.0 + wave(*cast, t)) for cast in light.cast_waves])
    return canvas * scale + wave(*light.offset_wave, t)


# ----------------------------------------------------------------------------------------------------
# Random layer parameters


def random_tint(rng: np.random.Generator, texture: str) -> tuple[float, float, float]:
    """Grey photographs get a random colour; colour ones a mild cast."""
    if texture in GREY_SOURCES:
        return tuple(float(c) for c in rng.uniform(0.35, 1.15, size=3))
    return tuple(float(c) for c in rng.uniform(0.85, 1.15, size=3))


def random_background(
    rng: np.random.Generator, preset: SyntheticPreset, shape: tuple[int, int], textures: dict[str, np.ndarray]
) -> Background:
    """A random photograph, zoomed so that it can pan by up to `preset.pan` of its spare room."""
    texture = str(rng.choice(PHOTOGRAPHS))
    source_height, source_width = textures[texture].shape[:2]
    height, width = shape
    zoom = min((source_height - 1) / height, (source_width - 1) / width) * rng.uniform(0.55, 0.8)
    room_x, room_y = source_width - 1 - width * zoom, source_height - 1 - height * zoom
    start_x, start_y = rng.uniform(0.0, 1.0, size=2)
    end_x = np.clip(start_x + preset.pan * rng.uniform(-1.0, 1.0), 0.0, 1.0)
    end_y = np.clip(start_y + preset.pan * rng.uniform(-0.5, 0.5), 0.0, 1.0)
    return Background(
        texture,
        random_tint(rng, texture),
        float(zoom),
        (float(start_x * room_x), float(start_y * room_y)),
        (float(end_x * room_x), float(end_y * room_y)),
    )


def _blob(rng: np.random.Generator) -> tuple[tuple[tuple[float, float, float, float], ...], float]:
    """A body ellipse and one or two lobes on its outline; returns (ellipses, extent)."""
    body = (0.0, 0.0, 1.0, float(rng.uniform(0.55, 0.9)))
    ellipses = [body]
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0.0, 2.0 * math.pi)
        centre_u, centre_v = round(0.8 * math.cos(angle), 9), round(0.8 * body[3] * math.sin(angle), 9)
        ellipses.append((centre_u, centre_v, float(rng.uniform(0.3, 0.5)), float(rng.uniform(0.3, 0.5))))
    extent = max(math.sqrt(u * u + v * v) + max(a, b) for u, v, a, b in ellipses)
    return tuple(ellipses), extent


def random_sprite(
    rng: np.random.Generator,
    preset: SyntheticPreset,
    shape: tuple[int, int],
    frames: int,
    textures: dict[str, np.ndarray],
    label: int,
    texture: str,
    tint: tuple[float, float, float],
    entrance: str,
) -> Sprite:
    """A sprite whose path is visible at frame 0 (entrance 'start'), enters later ('late'), or may
    wander anywhere ('any', for distractors)."""
    height, width = shape
    ellipses, extent = _blob(rng)
    radius = preset.object_size * height * rng.uniform(0.8, 1.25)
    source_height, source_width = textures[texture].shape[:2]
    # the warps reach about 1.6 extents out; keep that inside the photograph
    scale = min(rng.uniform(0.5, 1.2) * radius, (min(source_height, source_width) / 2 - 2) / (1.6 * extent))
    margin = 1.6 * extent * scale
    texture_centre = (
        float(rng.uniform(margin, source_width - 1 - margin)),
        float(rng.uniform(margin, source_height - 1 - margin)),
    )
    cycles = rng.uniform(0.4, 1.0, size=2)
    frequency = 2.0 * math.pi * cycles / frames
    amplitude = preset.motion * np.array([width, height]) * rng.uniform(0.5, 1.0, size=2)
    phase = rng.uniform(0.0, 2.0 * math.pi, size=2)
    # keep the path inside the frame by default, so leaving it is a knob of its own
    lo, hi = np.array([radius, radius]), np.array([width - radius, height - radius])
    amplitude = np.minimum(amplitude, np.maximum((hi - lo) / 2.0, 0.0))
    centre = rng.uniform(lo + amplitude, np.maximum(hi - amplitude, lo + amplitude))
    if entrance == "start" and rng.uniform() < preset.exit_fraction:
        # one full horizontal swing that carries it out of the frame and back
        amplitude[0], frequency[0], phase[0] = width / 2.0 + radius * extent, 2.0 * math.pi / frames, 0.0
        centre[0] = width / 2.0
    if entrance == "late":
        # start beyond a side edge, enter within the first half, then keep going across
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        outside = width / 2.0 + radius * extent * 1.7
        amplitude[0], phase[0] = outside, math.pi / 2.0 if side > 0 else -math.pi / 2.0
        frequency[0] = math.pi / 2.0 / (frames * rng.uniform(0.35, 0.5))
        centre[0] = width / 2.0
    if entrance == "start":
        # make sure the first frame shows it well inside the frame
        first = centre + np.array([wave(a, 0.0, p, 0.0) for a, p in zip(amplitude, phase)])
        shift = np.clip(first, lo, hi) - first
        centre = centre + shift
    return Sprite(
        ellipses=ellipses,
        extent=extent,
        texture=texture,
        tint=tint,
        texture_centre=texture_centre,
        texture_scale=float(scale),
        label=label,
        radius=float(radius),
        centre=(float(centre[0]), float(centre[1])),
        amplitude=(float(amplitude[0]), float(amplitude[1])),
        frequency=(float(frequency[0]), float(frequency[1])),
        phase=(float(phase[0]), float(phase[1])),
        angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        spin=float(preset.spin * rng.uniform(-1.0, 1.0)),
        scale_wave=(
            preset.scale_change * float(rng.uniform(0.5, 1.0)),
            2.0 * math.pi / frames,
            float(rng.uniform(0.0, 2.0 * math.pi)),
        ),
        bend_wave=(
            preset.deform * float(rng.uniform(0.5, 1.0)),
            4.0 * math.pi / frames,
            float(rng.uniform(0.0, 2.0 * math.pi)),
        ),
        ripple_wave=(
            preset.deform * float(rng.uniform(0.5, 1.0)),
            6.0 * math.pi / frames,
            float(rng.uniform(0.0, 2.0 * math.pi)),
        ),
    )


def random_occluder(
    rng: np.random.Generator, shape: tuple[int, int], frames: int, textures: dict[str, np.ndarray]
) -> Occluder:
    """A bar of a random photograph that sweeps across once, entering after frame 0."""
    height, width = shape
    texture = str(rng.choice(PHOTOGRAPHS))
    source_height, source_width = textures[texture].shape[:2]
    half_width = width * rng.uniform(0.05, 0.1)
    start = rng.uniform(0.1, 0.5) * frames  # never in frame 0: the first mask shows the objects whole
    return Occluder(
        texture=texture,
        tint=random_tint(rng, texture),
        origin=((source_width - 1) / 2.0, (source_height - 1) / 2.0),
        half_width=float(half_width),
        tilt=float(rng.uniform(-0.3, 0.3)),
        start=float(start),
        end=float(start + rng.uniform(0.3, 0.5) * frames),
        leftwards=bool(rng.uniform() < 0.5),
    )


def _light_wave(rng: np.random.Generator, amplitude: float, frames: int) -> tuple[float, float, float]:
    """(amplitude, frequency, phase) for `wave`: half to all of `amplitude`, 0.5-1.5 cycles per video."""
    return (
        float(amplitude * rng.uniform(0.5, 1.0)),
        2.0 * math.pi * float(rng.uniform(0.5, 1.5)) / frames,
        float(rng.uniform(0.0, 2.0 * math.pi)),
    )


def random_light(rng: np.random.Generator, preset: SyntheticPreset, frames: int) -> Light:
    """Gain, per-channel cast (a third of the gain's amplitude) and offset oscillating over the video."""
    return Light(
        gain_wave=_light_wave(rng, preset.illumination, frames),
        cast_waves=tuple(_light_wave(rng, preset.illumination / 3.0, frames) for _ in range(3)),
        offset_wave=_light_wave(rng, 100.0 * preset.illumination, frames),
    )
