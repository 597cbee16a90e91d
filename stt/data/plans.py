"""Where a training stream's rows come from, without Ray: the source, its plan of units, and which units a
stream visits.

The source (Parquet shards from stt.data.prepare, or a raw YouTube-VOS / DAVIS / image-folder layout;
`resolve_source`) is cut into UNITS of whole videos, about 256 frames each: a shard row group, or the same
packing of a raw listing (a `Plan` of numpy arrays, so it sits once in Ray's object store and reads zero-copy).
One epoch visits every unit once, in an order drawn from (seed, epoch) (`draw_unit`), so the unit ids 0, 1, 2,
... name an endless sequence of epochs; a stream is a range of them (`stream_units`: whole epochs, or as many
rows as training needs, starting where a resumed run left off). Each stream has its plan: `pair_plan` (temporal
pairs, `frame_gap` list steps apart), `view_plan` (the spatial stage's images: `data.images`, else every frame of
`data.root`), `vfs_plan` (one VFS pair per video). stt.data.pipeline turns a unit into its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from stt.config import DataConfig
from stt.data import prepare
from stt.data.layouts import DatasetError, read_rgb_or_none
from stt.data.transforms import decode_rgb_or_none

FRAMES_PER_UNIT = 256  # raw sources; shards use their row groups


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    kind: str  # shards | ytvos | davis | images
    root: str


def resolve_source(root: str, images: bool = False) -> Source:
    """What `root` holds: a shard folder (any URI), a raw layout, or "" for the embedded synthetic set."""
    if not root:
        from stt.data.synthetic import ensure_dataset

        return Source("ytvos", str(ensure_dataset("ytvos")))
    if prepare.is_shard_folder(root):
        return Source("shards", root)
    path = Path(root)
    if any((path / folder / "JPEGImages").is_dir() for folder in (".", "train", "train_all_frames")):
        return Source("ytvos", root)
    if (path / "ImageSets" / "2017").is_dir():
        return Source("davis", root)
    if images and path.is_dir():
        return Source("images", root)
    raise DatasetError(
        f"{root}: not a shard folder ({prepare.MANIFEST}), a YouTube-VOS root (JPEGImages/ or train/JPEGImages/) "
        f"or a DAVIS-2017 root (ImageSets/2017/){' or an image folder' if images else ''}"
    )


@dataclass
class Clip:
    """One video of a unit as the pair maker sees it: frame numbers, source names, a decoder by position."""

    name: str
    frames: list[int]
    sources: list[str]
    decode: Callable[[int], np.ndarray | None]


def _utf8(names: list[str]) -> np.ndarray:
    return np.array([name.encode() for name in names], dtype=bytes)


@dataclass(frozen=True)
class Plan:
    """A source cut into units of whole videos, as numpy arrays (so `ray.get` in a task is zero-copy).

    names, counts: V video names (utf-8 bytes) and frame counts, in unit order; unit_start: U + 1
    offsets into them. Raw sources: frames, paths: every frame's number and file, video by video.
    Shards: files, row_groups: the shard file and row group of each unit.
    """

    names: np.ndarray
    counts: np.ndarray
    unit_start: np.ndarray
    frames: np.ndarray | None = None
    paths: np.ndarray | None = None
    files: np.ndarray | None = None
    row_groups: np.ndarray | None = None

    @property
    def num_units(self) -> int:
        return len(self.unit_start) - 1

    def clips(self, unit: int, shard_root: str | None) -> list[Clip]:
        """The videos of `unit`, decodable frame by frame (shards: one row group read; raw: files)."""
        first, last = self.unit_start[unit], self.unit_start[unit + 1]
        names = [name.decode() for name in self.names[first:last]]
        counts = self.counts[first:last].tolist()
        if self.files is None:
            offset = int(self.counts[:first].sum())
            clips = []
            for name, count in zip(names, counts):
                paths = [p.decode() for p in self.paths[offset : offset + count]]
                frames = self.frames[offset : offset + count].tolist()
                clips.append(Clip(name, frames, paths, lambda i, paths=paths: read_rgb_or_none(paths[i])))
                offset += count
            return clips
        file, row_group = self.files[unit].decode(), int(self.row_groups[unit])
        table = prepare.read_row_group(shard_root, file, row_group, ["video", "frame", "source", "jpeg"])
        if table.column("video").to_pylist() != [n for name, count in zip(names, counts) for n in [name] * count]:
            raise DatasetError(
                f"{shard_root}/{file}: row group {row_group} does not hold the videos "
                f"{prepare.MANIFEST} lists for it; expected an unmodified shard folder"
            )
        frames, sources, jpegs = (
            table.column("frame").to_pylist(),
            table.column("source").to_pylist(),
            table.column("jpeg"),
        )
        clips, start = [], 0
        for name, count in zip(names, counts):
            clips.append(
                Clip(
                    name,
                    frames[start : start + count],
                    sources[start : start + count],
                    lambda i, start=start: decode_rgb_or_none(jpegs[start + i].as_py()),
                )
            )
            start += count
        return clips


def _offsets(sizes: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


def shard_plan(uri: str) -> tuple[str, Plan]:
    """(kind of the prepared layout, plan) of a finished shard folder; a unit is a row group."""
    manifest = prepare.read_manifest(uri)
    units = [
        (shard["file"], index, group) for shard in manifest["shards"] for index, group in enumerate(shard["row_groups"])
    ]
    videos = [video for _, _, group in units for video in group]
    return manifest["kind"], Plan(
        names=_utf8([name for name, _ in videos]),
        counts=np.array([count for _, count in videos], dtype=np.int64),
        unit_start=_offsets([len(group) for _, _, group in units]),
        files=_utf8([file for file, _, _ in units]),
        row_groups=np.array([index for _, index, _ in units], dtype=np.int64),
    )


def raw_plan(source: Source, as_images: bool = False) -> Plan:
    """Plan of a raw layout; units pack whole videos to about FRAMES_PER_UNIT frames. `as_images`:
    every frame of a video layout becomes a one-frame video (the spatial stage)."""
    videos = prepare.list_videos(source.kind, source.root)
    if as_images and source.kind != "images":
        videos = [
            prepare.Video(f"{v.name}/{frame}", (frame,), (path,))
            for v in videos
            for frame, path in zip(v.frames, v.paths)
        ]
    units = prepare.pack_videos(videos, FRAMES_PER_UNIT)
    videos = [video for unit in units for video in unit]
    return Plan(
        names=_utf8([v.name for v in videos]),
        counts=np.array([len(v.frames) for v in videos], dtype=np.int64),
        unit_start=_offsets([len(unit) for unit in units]),
        frames=np.array([f for v in videos for f in v.frames], dtype=np.int64),
        paths=_utf8([p for v in videos for p in v.paths]),
    )


# --------------------------------------------------------------------------- each stream's plan


def video_plan(source: Source) -> tuple[Plan, str | None]:
    """(plan, shard root or None) of a video `source` (shards of videos, a YouTube-VOS or DAVIS layout)."""
    if source.kind == "shards":
        kind, plan = shard_plan(source.root)
        if kind == "images":
            raise DatasetError(f"{source.root}: shards of single images; expected video frames (prepare ytvos|davis)")
    elif source.kind in ("ytvos", "davis"):
        plan = raw_plan(source)
    else:
        raise DatasetError(f"{source.root}: a {source.kind} source; expected video frames (shards, ytvos or davis)")
    return plan, source.root if source.kind == "shards" else None


def pair_plan(data_cfg: DataConfig, source: Source | None = None) -> tuple[Plan, str | None, np.ndarray]:
    """(plan, shard root or None, pairs per unit) of the temporal stream over `source` (None: `data.root`)."""
    source = source or resolve_source(data_cfg.root)
    if data_cfg.frame_gap < 1:
        raise ValueError(f"data.frame_gap: expected at least 1 list step, got {data_cfg.frame_gap}")
    plan, shard_root = video_plan(source)
    if note := frame_spacing_note(plan, data_cfg.frame_gap, source.root):
        print(note)
    return plan, shard_root, _per_unit(plan, np.clip(plan.counts - data_cfg.frame_gap, 0, None))


def view_plan(data_cfg: DataConfig, source: Source | None = None) -> tuple[Plan, str | None, np.ndarray]:
    """(plan, shard root or None, images per unit) of the spatial stream: `data.images`, else the frames of
    `data.root`."""
    if source is None:
        source = resolve_source(data_cfg.images, images=True) if data_cfg.images else resolve_source(data_cfg.root)
    plan = shard_plan(source.root)[1] if source.kind == "shards" else raw_plan(source, as_images=True)
    return plan, source.root if source.kind == "shards" else None, _per_unit(plan, plan.counts)


def vfs_plan(data_cfg: DataConfig, source: Source | None = None) -> tuple[Plan, str | None, np.ndarray]:
    """(plan, shard root or None, pairs per unit) of the VFS stream over video `source` (None: `data.root`): one
    pair per video of at least 2 frames per epoch (VFS samples one clip per video per epoch, as mmaction's
    VideoDataset)."""
    plan, shard_root = video_plan(source or resolve_source(data_cfg.root))
    return plan, shard_root, _per_unit(plan, (plan.counts >= 2).astype(np.int64))


def _per_unit(plan: Plan, video_rows: np.ndarray) -> np.ndarray:
    """Rows per unit from rows per video (videos are stored unit by unit)."""
    return np.add.reduceat(video_rows, plan.unit_start[:-1]) if plan.num_units else np.zeros(0, dtype=np.int64)


def raw_frame_step(plan: Plan) -> int:
    """The median step between consecutive frame numbers of a raw plan's videos: 5 for YouTube-VOS
    `train/` (every 5th raw frame listed), 1 for `train_all_frames/` and DAVIS."""
    starts = np.cumsum(plan.counts) - plan.counts
    steps = np.diff(plan.frames)
    within_video = np.ones(len(steps), dtype=bool)
    within_video[starts[1:] - 1] = False  # the step from one video's last frame to the next one's first
    return int(np.median(steps[within_video])) if within_video.any() else 1


def frame_spacing_note(plan: Plan, frame_gap: int, root: str) -> str | None:
    """One line when a raw listing of every frame meets frame_gap 1 (pairs of adjacent raw frames), else None."""
    if plan.frames is None or frame_gap != 1 or raw_frame_step(plan) != 1:
        return None
    return (
        f"stt.data: {root} lists every raw frame (e.g. YouTube-VOS train_all_frames), so data.frame_gap=1 pairs "
        "adjacent raw frames; the paper's pairs are ~0.17 s apart: data.frame_gap=5 at 30 fps, 4 at 24 fps"
    )


# --------------------------------------------------------------------------- the units a stream visits


def draw_unit(unit_id: int, num_units: int, seed: int) -> tuple[int, np.random.Generator]:
    """The unit that row `unit_id` of the range dataset stands for, and the generator of all its
    randomness: epoch unit_id // num_units visits every unit once, in an order drawn from (seed, epoch)."""
    epoch, position = divmod(unit_id, num_units)
    unit = int(np.random.default_rng([seed, epoch]).permutation(num_units)[position])
    return unit, np.random.default_rng([seed, epoch, unit])


def stream_units(
    unit_rows: np.ndarray, seed: int, epochs: int = 1, rows: int | None = None, skip_rows: int = 0
) -> range:
    """The unit ids (rows of the range dataset, see `draw_unit`) a stream visits.

    unit_rows: U rows per unit (pairs or images, if no frame is corrupt). Without `rows`: `epochs`
    whole epochs. With `rows`: from the first unit not wholly inside the first `skip_rows` rows of
    the epoch order (a resumed run skips what it consumed), to the end of the epoch in which
    `rows` more rows have been reached. Rows are counted in unit order; Ray Data does not keep
    that order exactly, so a resumed stream may repeat or skip a few units' worth of rows.
    """
    if epochs < 1:
        raise ValueError(f"epochs: expected at least 1, got {epochs}")
    if (rows is not None and rows < 1) or skip_rows < 0:
        raise ValueError(f"rows: expected at least 1 and skip_rows at least 0, got rows={rows}, skip_rows={skip_rows}")
    num_units = len(unit_rows)
    if rows is None and skip_rows == 0:
        return range(epochs * num_units)
    per_epoch = int(unit_rows.sum())
    if per_epoch == 0:
        raise DatasetError("the source yields no rows (every video is shorter than the frame gap)")
    first = 0
    consumed = 0
    while True:  # skip whole epochs arithmetically, then units of the epoch where skip_rows falls
        if first % num_units == 0 and consumed + per_epoch <= skip_rows:
            consumed += per_epoch
            first += num_units
            continue
        unit = draw_unit(first, num_units, seed)[0]
        if consumed + unit_rows[unit] > skip_rows:
            break
        consumed += int(unit_rows[unit])
        first += 1
    if rows is None:
        return range(first, first + epochs * num_units)
    needed_until = skip_rows + rows  # rows counted from the start of the first epoch
    end_epoch = -(-needed_until // per_epoch)  # ceil: whole epochs
    return range(first, max(end_epoch * num_units, first + 1))
