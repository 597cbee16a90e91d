"""Deterministic synthetic videos in the official DAVIS-2017, YouTube-VOS, JHMDB and VIP layouts.

With no data at hand every stt command still runs: `ensure_dataset` renders a small set once, in exactly
the official layouts, so the readers and evaluators in stt serve real and synthetic data alike.

The videos are made hard enough that a random-init encoder clearly loses to a trained one: objects are
textured with crops of real photographs (scikit-image's bundled images), and move, rotate, scale and bend
over a panning photograph; look-alike distractors (same texture, labelled background), an occluding bar
sweeping across, illumination changes, objects that leave the frame and come back, JPEG artefacts.
JHMDB and VIP show an articulated, textured puppet with the 15 JHMDB joints and VIP part classes.

Same seed, same bytes on every machine (numerics.py says how); encoded bytes are then fixed by the pinned
pillow (JPEG, PNG) and scikit-image (source photographs) versions.

The modules, in the order a frame is made:
  presets.py   SyntheticPreset: sizes and difficulty; the tiny, default and hard presets
  numerics.py  per-video random streams, rounded waves, bilinear sampling, the source photographs
  layers.py    background, textured blobs, occluder bar, light: drawing and random parameters
  scenes.py    object videos (DAVIS, YouTube-VOS): scene, frames and masks, ids by appearance
  puppet.py    person videos (JHMDB, VIP): the articulated puppet, its joints and part classes
  writers.py   the four official layouts and their encoders (JPEG, PNG, MAT)
  cache.py     generate (a folder) and ensure_dataset (the embedded default, generated once)
  cli.py       python -m stt.data.synthetic
"""

from stt.data.synthetic.cache import GENERATOR_VERSION, ensure_dataset, generate, remove_stale_scratch
from stt.data.synthetic.cli import main
from stt.data.synthetic.layers import Sprite
from stt.data.synthetic.numerics import bilinear, bilinear_grid, load_textures
from stt.data.synthetic.presets import PRESETS, SyntheticPreset
from stt.data.synthetic.puppet import (
    JHMDB_ACTIONS,
    JHMDB_JOINTS,
    VIP_CLASSES,
    Puppet,
    puppet_joints,
    random_puppet_scene,
    render_puppet_frame,
)
from stt.data.synthetic.scenes import random_object_scene, relabel_by_appearance, render_object_frame
from stt.data.synthetic.writers import KIND_DIRS, KINDS, write_davis, write_jhmdb, write_vip, write_ytvos

__all__ = [
    "GENERATOR_VERSION",
    "JHMDB_ACTIONS",
    "JHMDB_JOINTS",
    "KINDS",
    "KIND_DIRS",
    "PRESETS",
    "VIP_CLASSES",
    "Puppet",
    "Sprite",
    "SyntheticPreset",
    "bilinear",
    "bilinear_grid",
    "ensure_dataset",
    "generate",
    "load_textures",
    "main",
    "puppet_joints",
    "random_object_scene",
    "random_puppet_scene",
    "relabel_by_appearance",
    "remove_stale_scratch",
    "render_object_frame",
    "render_puppet_frame",
    "write_davis",
    "write_jhmdb",
    "write_vip",
    "write_ytvos",
]
