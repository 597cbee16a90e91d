"""What a person watching a run sees besides the numbers: progress lines with elapsed time and an
ETA, and the propagated-mask panel an in-training DAVIS evaluation leaves for TensorBoard.

The formatting and the panel are pure functions, tested without Ray.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from ray.tune import Callback

MASKS_PNG = "davis_masks.png"  # beside checkpoint.pt in a Ray Train checkpoint folder that was evaluated


# ----------------------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    """Compact wall time: 42s, 3m05s, 2h03m, 1d04h."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def eta_seconds(done: int, total: int, elapsed_s: float, first_s: float | None = None) -> float | None:
    """Seconds left for `total - done` more units at the mean time per unit measured so far.

    `first_s`: how long the first unit took; once a second unit has run it is left out of the mean
    (a training step's first one pays for the data stream's start and the allocator's warm-up).
    Periodic costs (checkpoints, evaluations) stay in the mean: they recur. None before any unit.
    """
    if done <= 0:
        return None
    if first_s is not None and done >= 2:
        per_unit = max(0.0, elapsed_s - first_s) / (done - 1)
    else:
        per_unit = elapsed_s / done
    return per_unit * max(0, total - done)


def progress_text(done: int, total: int, elapsed_s: float, first_s: float | None = None) -> str:
    """`elapsed 3m05s  eta 1h02m` (`eta ?` before the first unit)."""
    eta = eta_seconds(done, total, elapsed_s, first_s)
    return f"elapsed {format_duration(elapsed_s)}  eta {'?' if eta is None else format_duration(eta)}"


class TrialProgress(Callback):
    """A Ray Tune callback printing one line per finished trial of a phase: how many of how many
    (trials a resumed phase had finished before count too), the elapsed time of this process's part
    and an ETA at its mean time per finished trial (trials run concurrently and ASHA stops some
    early, so it is a rough figure)."""

    def __init__(self, phase: str, total: int, prefix: str = "sweep"):
        self.phase, self.total, self.prefix = phase, total, prefix
        self.started, self.before = time.time(), None

    def setup(self, **info):  # Tune calls it at the start of a fresh or a resumed experiment
        self.started, self.before = time.time(), None

    def line(self, trials, trial, how: str) -> str:
        done = 1 + sum(t is not trial and t.status in ("TERMINATED", "ERROR") for t in trials)
        if self.before is None:
            self.before = done - 1  # finished before this process took the phase over
        eta = progress_text(done - self.before, self.total - self.before, time.time() - self.started)
        return f"{self.prefix}: {self.phase} trials {done}/{self.total} done ({trial.trial_id} {how})  {eta}"

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(self.line(trials, trial, "finished"), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(self.line(trials, trial, "failed"), flush=True)


# ----------------------------------------------------------------------------------------- mask panel
def overlay(frame: np.ndarray, mask: np.ndarray, palette: list[int]) -> np.ndarray:
    """The mask's palette colours blended at 50 % over the frame where it is not background (0)."""
    colours = np.asarray((list(palette) + [0] * 768)[:768], dtype=np.float32).reshape(256, 3)
    alpha = np.where(mask[..., None] > 0, 0.5, 0.0)
    return (frame * (1 - alpha) + colours[mask] * alpha).round().astype(np.uint8)


def mask_panel(frames: np.ndarray, predicted: np.ndarray, truth: np.ndarray, palette: list[int], *,
               rows: int = 4, tile_height: int = 96) -> np.ndarray:
    """H x W x 3 uint8 grid: one row per chosen frame (evenly spaced, first and last included), columns
    frame | prediction over it | ground truth over it, each tile scaled to `tile_height` rows."""
    count = min(len(frames), len(predicted), len(truth))
    chosen = sorted(set(np.linspace(0, count - 1, min(rows, count)).round().astype(int).tolist()))
    height, width = frames.shape[1:3]
    size = (max(1, round(width * tile_height / height)), tile_height)

    def tile(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))

    grid = [np.concatenate([tile(frames[i]), tile(overlay(frames[i], predicted[i], palette)),
                            tile(overlay(frames[i], truth[i], palette))], axis=1) for i in chosen]
    return np.concatenate(grid, axis=0)


def davis_panel_png(davis_root: Path, split: str, results: Path, **panel_kwargs) -> bytes:
    """PNG bytes of `mask_panel` for the split's first sequence, from the indexed PNGs that
    stt.evaluate wrote under `results/<sequence>/`."""
    from stt.data.layouts import DAVIS, read_mask

    dataset = DAVIS(davis_root, split=split)
    seq = dataset.sequences[0]
    predicted = np.stack([read_mask(results / seq / f"{path.stem}.png") for path in dataset.mask_paths(seq)])
    panel = mask_panel(dataset.read_frames(seq), predicted, dataset.read_masks(seq), dataset.palette(seq), **panel_kwargs)
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
