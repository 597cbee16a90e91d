"""What a person watching a run sees besides the numbers: progress lines with elapsed time and an
ETA (training steps, sweep trials, and every long loop through `with_progress`), and the
propagated-mask panel an in-training DAVIS evaluation leaves for TensorBoard.

The formatting and the panel are pure functions, tested without Ray. Ray Tune is imported only for
`TrialProgress` (see `__getattr__`), so stt.evaluate and stt.data.prepare use this module's progress
lines on machines without Ray (bench/gpu_suite.py evaluates on a bare GPU machine).
"""

from __future__ import annotations

import functools
import io
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from PIL import Image

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


Item = TypeVar("Item")
# Off a terminal, at most one line this often: a log then grows with the wall time, not with the
# number of units (30 DAVIS sequences and 3,471 YouTube-VOS videos alike), a slow step still shows
# a sign of life every minute, and a fast one (tests, the synthetic sets) leaves just its final line.
LINE_EVERY_S = 60.0


def rate_text(done: int, elapsed_s: float, unit: str) -> str:
    """`12.5 frames/s` at one unit a second or more, else the time a unit takes: `2.5s/seq`, `3m05s/shard`."""
    if done <= 0 or elapsed_s <= 0:
        return f"? {unit}/s"
    if done >= elapsed_s:
        return f"{done / elapsed_s:.3g} {unit}/s"
    per_unit = elapsed_s / done
    return f"{format_duration(per_unit) if per_unit >= 60 else f'{per_unit:.2g}s'}/{unit}"


def progress_line(label: str, unit: str, done: int, total: int, elapsed_s: float, name: str = "") -> str:
    """`davis 12/30 seq (40%)  4.8s/seq  elapsed 57s  eta 1m26s  bike-packing` (`name`: the last unit done).

    The ETA is the mean time per unit so far (progress_text without `first_s`): units of a loop cost
    alike, and with a process pool the first result arrives with the first batch of workers, so
    leaving it out would make the others look free.
    """
    percent = f"{100 * done // total}%" if total else "-"
    parts = [
        f"{label} {done}/{total} {unit} ({percent})",
        rate_text(done, elapsed_s, unit),
        progress_text(done, total, elapsed_s),
    ]
    return "  ".join(parts + ([name] if name else []))


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class Progress:
    """done/total, rate, elapsed time and ETA of a long loop, for a person watching it.

    Written to stderr (tqdm's convention), so stdout keeps only results: `stt.evaluate davis > table`
    still holds just the table. On a terminal the line is redrawn in place after every unit; anywhere
    else (a log file, Ray's forwarded output, pytest's capture) redrawn lines would pile up as
    carriage-return garbage, so a line is printed at most every `every_s` seconds (LINE_EVERY_S), and
    once when the last unit is done.
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str,
        *,
        stream: IO[str] | None = None,
        every_s: float = LINE_EVERY_S,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.label, self.unit, self.every_s, self.clock = total, label, unit, every_s, clock
        self.stream = sys.stderr if stream is None else stream  # looked up now: pytest swaps sys.stderr per test
        self.in_place = is_terminal(self.stream)
        self.done, self.started = 0, clock()
        self.last_line = self.started

    def advance(self, name: str = "") -> None:
        """One more unit done; `name` says which (a sequence, a video)."""
        self.done += 1
        now = self.clock()
        line = progress_line(self.label, self.unit, self.done, self.total, now - self.started, name)
        if self.in_place:
            width = shutil.get_terminal_size().columns - 1  # a line wider than the terminal would wrap, not redraw
            self.stream.write("\r" + line[:width] + "\x1b[K" + ("\n" if self.done == self.total else ""))
        elif self.done == self.total or now - self.last_line >= self.every_s:
            self.stream.write(line + "\n")
            self.last_line = now
        self.stream.flush()

    def close(self) -> None:
        """A loop left early (an error, a break) ends the redrawn line, so what is printed next starts a fresh one."""
        if self.in_place and 0 < self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()


def with_progress(
    items: Iterable[Item],
    label: str,
    unit: str,
    *,
    total: int | None = None,
    name: Callable[[Item], str] | None = None,
    enabled: bool = True,
    stream: IO[str] | None = None,
) -> Iterator[Item]:
    """`items`, reporting a `Progress` line as the body of the loop finishes each one.

    total: defaults to len(items); name: what the line calls an item (default: nothing);
    enabled: False yields the items silently (in-training evaluations, sweep trials).
    """
    if not enabled:
        yield from items
        return
    progress = Progress(len(items) if total is None else total, label, unit, stream=stream)
    try:
        for item in items:
            yield item
            progress.advance(name(item) if name is not None else "")
    finally:
        progress.close()


class TrialLines:
    """What TrialProgress (a Ray Tune callback) prints: one line per finished trial of a phase, how many
    of how many (trials a resumed phase had finished before count too), the elapsed time of this
    process's part and an ETA at its mean time per finished trial (trials run concurrently and ASHA
    stops some early, so it is a rough figure). One line per trial rather than a `Progress` line: each
    says which trial finished or failed, and Tune's own status tables share the output."""

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


def __getattr__(name: str):
    """`stt.observe.TrialProgress` (PEP 562): the Ray Tune callback, built on first use so that importing
    this module does not import Ray."""
    if name == "TrialProgress":
        return trial_progress_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def trial_progress_class() -> type:
    from ray.tune import Callback

    class TrialProgress(TrialLines, Callback):
        __doc__ = TrialLines.__doc__

    TrialProgress.__qualname__ = "TrialProgress"  # pickled by name, found again through __getattr__
    return TrialProgress


# ----------------------------------------------------------------------------------------- mask panel
def overlay(frame: np.ndarray, mask: np.ndarray, palette: list[int]) -> np.ndarray:
    """The mask's palette colours blended at 50 % over the frame where it is not background (0)."""
    colours = np.asarray((list(palette) + [0] * 768)[:768], dtype=np.float32).reshape(256, 3)
    alpha = np.where(mask[..., None] > 0, 0.5, 0.0)
    return (frame * (1 - alpha) + colours[mask] * alpha).round().astype(np.uint8)


def save_overlays(frames: np.ndarray, masks: np.ndarray, palette: list[int], out_dir: Path) -> None:
    """PNG per frame (the prediction `overlay`ed on the frame) and one GIF of them all (`evaluate --overlays`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blended = [Image.fromarray(overlay(frame, mask, palette)) for frame, mask in zip(frames, masks)]
    for index, image in enumerate(blended):
        image.save(out_dir / f"{index:05d}.png")
    blended[0].save(out_dir / "overlay.gif", save_all=True, append_images=blended[1:], duration=100, loop=0)


def mask_panel(
    frames: np.ndarray,
    predicted: np.ndarray,
    truth: np.ndarray,
    palette: list[int],
    *,
    rows: int = 4,
    tile_height: int = 96,
) -> np.ndarray:
    """H x W x 3 uint8 grid: one row per chosen frame (evenly spaced, first and last included), columns
    frame | prediction over it | ground truth over it, each tile scaled to `tile_height` rows."""
    count = min(len(frames), len(predicted), len(truth))
    chosen = sorted(set(np.linspace(0, count - 1, min(rows, count)).round().astype(int).tolist()))
    height, width = frames.shape[1:3]
    size = (max(1, round(width * tile_height / height)), tile_height)

    def tile(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))

    grid = [
        np.concatenate(
            [
                tile(frames[i]),
                tile(overlay(frames[i], predicted[i], palette)),
                tile(overlay(frames[i], truth[i], palette)),
            ],
            axis=1,
        )
        for i in chosen
    ]
    return np.concatenate(grid, axis=0)


def davis_panel_png(davis_root: Path, split: str, results: Path, **panel_kwargs) -> bytes:
    """PNG bytes of `mask_panel` for the split's first sequence, from the indexed PNGs that
    stt.evaluate wrote under `results/<sequence>/`."""
    from stt.data.layouts import DAVIS, read_mask

    dataset = DAVIS(davis_root, split=split)
    seq = dataset.sequences[0]
    predicted = np.stack([read_mask(results / seq / f"{path.stem}.png") for path in dataset.mask_paths(seq)])
    panel = mask_panel(
        dataset.read_frames(seq), predicted, dataset.read_masks(seq), dataset.palette(seq), **panel_kwargs
    )
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
