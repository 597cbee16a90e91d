"""Where stt keeps what it can always rebuild, and with which file modes: extracted features
(stt.features.FeatureCache under `features/`) and the generated synthetic datasets
(stt.data.synthetic.ensure_dataset), both shared by a team.

A module of its own, importing nothing heavy, so that the dataset generator and the evaluator both
read these from here without pulling in each other's dependencies.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$STT_CACHE, or ~/.cache/stt when it is unset or empty (an empty value would mean the working folder)."""
    return Path(os.environ.get("STT_CACHE") or Path.home() / ".cache" / "stt")


def current_umask() -> int:
    """The process's file-mode creation mask, e.g. 0o022: what tempfile creates private (0600 files,
    0700 folders) is given the mode a plain open() or mkdir() would have, so the team can read it."""
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def save_atomically(state: dict, path: Path) -> None:
    """torch.save `state` to `path` through a temporary file and a rename: a killed build never leaves a
    half-written cache entry (the propagation graphs and per-frame stores beside the feature cache)."""
    import torch  # on use: the dataset generator imports this module without torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
