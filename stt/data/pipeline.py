"""The training streams on Ray Data: (target, reference) frame pairs for the temporal stage and two
augmented views of an image for the spatial stage.

How the stream is built. The source (Parquet shards from stt.data.prepare, or a raw YouTube-VOS /
DAVIS / image-folder layout) is cut into UNITS of whole videos, about 256 frames each: a shard row
group, or the same packing of a raw listing. One epoch visits every unit once, in an order drawn
from (seed, epoch), so the unit ids 0, 1, 2, ... name an endless sequence of epochs; a stream is a
range of them (`stream_units`: whole epochs, or as many rows as training needs, starting where a
resumed run left off). The dataset is one row per unit id of that range -> `map_batches` of Ray tasks
(at most `data_cpus` CPUs at once) that turn one unit id into its pairs, so nothing is ever
materialised: Ray Data's streaming executor pulls units as the trainer consumes batches, and its
back-pressure bounds the memory. The listing (a `Plan` of numpy arrays) sits once in the object
store. Shards are read one row group at a time by the tasks themselves rather than with
`ray.data.read_parquet`, whose blocks may cut a video in two; a row group is exactly the unit
pairs are sampled from. Tasks rather than actors: Ray reuses warm worker processes for them.

Pairs. Every (i, i + frame_gap) of a video's frame list, i.e. `frame_gap` list steps (YouTube-VOS
lists every 5th raw frame, so the default 1 is 5 raw frames): the LATER frame is the target, the
earlier the reference (MAST reconstructs a frame from earlier ones). Both get one random resized
crop and one flip (stt.data.transforms). The videos of a unit are interleaved at random, so a
batch mixes videos; each video keeps only `frame_gap + 1` decoded frames alive and decodes each
frame once. Everything random is drawn from (seed, epoch, unit), so a stream is reproducible
whatever the scheduling (the order of its rows is not: Ray Data does not preserve order).

VFS pairs (`vfs_pair_dataset`, paper 003): one pair per video per epoch, two frames drawn by
stt.vfs.sample_frame_pair (distant sampling by default), each with its own crop and flip
(stt.data.augment.FramePairViews); the same units, seeds and resumption as the other streams.

Corrupt frames (unreadable, truncated, or empty in a shard) are skipped with the pairs that need
them and counted in a `SkippedFrames` actor: the honest place for a count, since a unit may lose
every pair and leave no row to carry it. The actor is told before the rows that follow a bad
frame are yielded, so a count read after consuming the stream is complete.

CPU budget: Ray Data stalls when Ray Train's workers hold every CPU. The decode tasks take
`data_cpus` CPUs; `check_cpu_budget` refuses a layout that does not leave them free.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import ray
import torch

from stt.config import DataConfig, SpatialConfig, VFSConfig
from stt.data import prepare
from stt.data.augment import FramePairViews, TwoViews
from stt.data.layouts import DatasetError, read_rgb_or_none
from stt.data.transforms import decode_rgb_or_none, pair_crops, to_chw

FRAMES_PER_UNIT = 256  # raw sources; shards use their row groups
ROWS_PER_CHUNK = 32  # rows per yielded block: small enough for steady streaming


@ray.remote(num_cpus=0)
class SkippedFrames:
    """Counts the corrupt frames a stream skipped; keeps the first few sources for the log."""

    def __init__(self, keep: int = 20):
        self.count = 0
        self.examples: list[str] = []
        self.keep = keep

    def add(self, sources: list[str]) -> None:
        self.count += len(sources)
        self.examples += sources[: self.keep - len(self.examples)]

    def total(self) -> int:
        return self.count

    def first_sources(self) -> list[str]:
        return self.examples


@dataclass
class Stream:
    """A training stream: hand `dataset` to the TorchTrainer (`datasets={"train": ...}`) and read the
    corrupt-frame count with `skipped_frames()` (or pass the `skipped` handle to the workers)."""

    dataset: ray.data.Dataset
    skipped: ray.actor.ActorHandle
    units_per_epoch: int
    rows_per_epoch: int  # pairs (temporal) or images (spatial) if no frame is corrupt

    def skipped_frames(self) -> int:
        return ray.get(self.skipped.total.remote())


# --------------------------------------------------------------------------- sources and units


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


# --------------------------------------------------------------------------- the per-unit work


def interleaved_pairs(
    clips: list[Clip], gap: int, rng: np.random.Generator, corrupt: list[str]
) -> Iterator[tuple[Clip, int, np.ndarray, np.ndarray]]:
    """(clip, reference position, target frame, reference frame) for every (i, i + gap) of every clip.

    Clips are interleaved in a random order while each clip's pairs run forward in time, so a clip
    holds at most gap + 1 decoded frames. Pairs with a corrupt frame are skipped; each corrupt
    frame's source is appended to `corrupt` once.
    """
    per_clip = [max(0, len(clip.frames) - gap) for clip in clips]
    schedule = rng.permutation(np.repeat(np.arange(len(clips)), per_clip))
    done = [0] * len(clips)
    caches: list[dict[int, np.ndarray | None]] = [{} for _ in clips]

    def frame(c: int, i: int) -> np.ndarray | None:
        if i not in caches[c]:
            caches[c][i] = clips[c].decode(i)
            if caches[c][i] is None:
                corrupt.append(clips[c].sources[i])
        return caches[c][i]

    for c in schedule:
        i = done[c]
        done[c] += 1
        for old in [k for k in caches[c] if k < i]:
            del caches[c][old]
        reference, target = frame(c, i), frame(c, i + gap)
        if reference is not None and target is not None:
            yield clips[c], i, target, reference


def draw_unit(unit_id: int, num_units: int, seed: int) -> tuple[int, np.random.Generator]:
    """The unit that row `unit_id` of the range dataset stands for, and the generator of all its
    randomness: epoch unit_id // num_units visits every unit once, in an order drawn from (seed, epoch)."""
    epoch, position = divmod(unit_id, num_units)
    unit = int(np.random.default_rng([seed, epoch]).permutation(num_units)[position])
    return unit, np.random.default_rng([seed, epoch, unit])


def _chunks(items: Iterator, before_each: Callable[[], None]) -> Iterator[list]:
    """Lists of up to ROWS_PER_CHUNK items; `before_each` runs before a list leaves (and at the end)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == ROWS_PER_CHUNK:
            before_each()
            yield chunk
            chunk = []
    before_each()
    if chunk:
        yield chunk


def report_corrupt(skipped, corrupt: list[str]) -> None:
    """Count the sources in `corrupt` in the `SkippedFrames` actor `skipped`, then empty the list."""
    if corrupt:
        ray.get(skipped.add.remote(list(corrupt)))  # waited for: counted before the rows that follow
        corrupt.clear()


def unit_pairs(
    plan: Plan, unit_id: int, shard_root: str | None, seed: int, cfg: DataConfig, report: Callable[[list[str]], None]
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the temporal pairs of one unit (no Ray); `report(corrupt)` is called with the
    sources of corrupt frames met so far (and must empty the list) before each batch leaves."""
    unit, rng = draw_unit(unit_id, plan.num_units, seed)
    corrupt: list[str] = []
    pairs = interleaved_pairs(plan.clips(unit, shard_root), cfg.frame_gap, rng, corrupt)
    # Crop as pairs come, so a chunk holds crops, not full frames.
    crops = (
        (clip, i, *pair_crops(t, r, rng, cfg.crop_size, cfg.crop_scale, cfg.crop_ratio)) for clip, i, t, r in pairs
    )
    for chunk in _chunks(crops, lambda: report(corrupt)):
        yield _pair_batch(chunk, cfg)


def make_pairs(
    batch: dict[str, np.ndarray],
    *,
    plan_ref: list,
    shard_root: str | None,
    seed: int,
    skipped,
    first_unit: int,
    data_cfg: DataConfig,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: row ids (column `id`; unit id = first_unit + id) -> batches of temporal pairs."""
    plan = ray.get(plan_ref[0])  # in a list, so Ray passes the reference and the array stays zero-copy
    for row_id in batch["id"]:
        yield from unit_pairs(
            plan, first_unit + int(row_id), shard_root, seed, data_cfg, lambda c: report_corrupt(skipped, c)
        )


def _pair_batch(pairs: list, cfg: DataConfig) -> dict[str, np.ndarray]:
    """(clip, reference position, target crop, reference crop) tuples -> one batch of columns."""
    reference_frames = np.array([clip.frames[i] for clip, i, _, _ in pairs], dtype=np.int64)
    target_frames = np.array([clip.frames[i + cfg.frame_gap] for clip, i, _, _ in pairs], dtype=np.int64)
    batch = {
        "target": to_chw(np.stack([t for _, _, t, _ in pairs])),
        "reference": to_chw(np.stack([r for _, _, _, r in pairs])),
        "video": np.array([clip.name for clip, _, _, _ in pairs], dtype=object),
        "target_frame": target_frames,
        "reference_frame": reference_frames,
        "gap": target_frames - reference_frames,
    }
    return batch


def make_views(
    batch: dict[str, np.ndarray],
    *,
    plan_ref: list,
    shard_root: str | None,
    seed: int,
    skipped,
    first_unit: int,
    image_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: row ids (column `id`; unit id = first_unit + id) -> batches of two MoCo v2
    views per image."""
    plan = ray.get(plan_ref[0])
    for row_id in batch["id"]:
        yield from unit_views(
            plan, first_unit + int(row_id), shard_root, seed, image_size, lambda c: report_corrupt(skipped, c)
        )


def unit_views(
    plan: Plan, unit_id: int, shard_root: str | None, seed: int, image_size: int, report: Callable[[list[str]], None]
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of two MoCo v2 views of every image of one unit (no Ray); `report` as in `unit_pairs`."""
    unit, rng = draw_unit(unit_id, plan.num_units, seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    two_views = TwoViews(image_size)
    images = [(clip, i) for clip in plan.clips(unit, shard_root) for i in range(len(clip.frames))]
    corrupt: list[str] = []
    decoded = _decode_all((images[k] for k in rng.permutation(len(images))), corrupt)
    views = ((name, *two_views(torch.from_numpy(rgb).permute(2, 0, 1), generator)) for name, rgb in decoded)
    for chunk in _chunks(views, lambda: report(corrupt)):
        yield {
            "view_q": torch.stack([q for _, q, _ in chunk]).numpy(),
            "view_k": torch.stack([k for _, _, k in chunk]).numpy(),
            "image": np.array([name for name, _, _ in chunk], dtype=object),
        }


def _decode_all(images: Iterator[tuple[Clip, int]], corrupt: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, RGB) of each readable image; the sources of unreadable ones go to `corrupt`."""
    for clip, i in images:
        rgb = clip.decode(i)
        if rgb is None:
            corrupt.append(clip.sources[i])
        else:
            yield (clip.name if len(clip.frames) == 1 else f"{clip.name}/{clip.frames[i]}"), rgb


def unit_vfs_pairs(
    plan: Plan, unit_id: int, shard_root: str | None, seed: int, vfs_cfg: VFSConfig, report: Callable[[list[str]], None]
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of VFS frame pairs of one unit (no Ray): one pair per video of at least 2 frames, the
    videos in a random order, the two frames drawn by `stt.vfs.sample_frame_pair` and each augmented
    on its own (`FramePairViews`); `report` as in `unit_pairs`. Columns: view_q, view_k 3 x S x S
    float32 ImageNet-normalised (S = vfs.image_size), video (str), first_frame, second_frame (frame numbers)."""
    from stt.vfs import sample_frame_pair

    unit, rng = draw_unit(unit_id, plan.num_units, seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    views = FramePairViews(vfs_cfg.image_size, vfs_cfg.crop_scale, vfs_cfg.color_aug)
    clips = [clip for clip in plan.clips(unit, shard_root) if len(clip.frames) >= 2]
    corrupt: list[str] = []

    def pairs():
        for c in rng.permutation(len(clips)):
            clip = clips[c]
            i, j = sample_frame_pair(len(clip.frames), rng, vfs_cfg.sampling, vfs_cfg.interval)
            first, second = clip.decode(i), clip.decode(j)
            corrupt.extend(clip.sources[k] for k, rgb in ((i, first), (j, second)) if rgb is None)
            if first is not None and second is not None:
                q, k = views(
                    torch.from_numpy(first).permute(2, 0, 1), torch.from_numpy(second).permute(2, 0, 1), generator
                )
                yield clip.name, clip.frames[i], clip.frames[j], q, k

    for chunk in _chunks(pairs(), lambda: report(corrupt)):
        yield {
            "view_q": torch.stack([row[3] for row in chunk]).numpy(),
            "view_k": torch.stack([row[4] for row in chunk]).numpy(),
            "video": np.array([row[0] for row in chunk], dtype=object),
            "first_frame": np.array([row[1] for row in chunk], dtype=np.int64),
            "second_frame": np.array([row[2] for row in chunk], dtype=np.int64),
        }


def make_vfs_pairs(
    batch: dict[str, np.ndarray],
    *,
    plan_ref: list,
    shard_root: str | None,
    seed: int,
    skipped,
    first_unit: int,
    vfs_cfg: VFSConfig,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: row ids (column `id`; unit id = first_unit + id) -> batches of VFS frame pairs."""
    plan = ray.get(plan_ref[0])
    for row_id in batch["id"]:
        yield from unit_vfs_pairs(
            plan, first_unit + int(row_id), shard_root, seed, vfs_cfg, lambda c: report_corrupt(skipped, c)
        )


# --------------------------------------------------------------------------- the datasets


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


def _build(fn, plan: Plan, shard_root: str | None, units: range, data_cpus: float, skipped, **fn_kwargs):
    if data_cpus <= 0:
        raise ValueError(f"data.data_cpus: expected a positive CPU count, got {data_cpus}")
    tasks = max(1, int(data_cpus))
    skipped = skipped or SkippedFrames.remote()
    # from_items, not ray.data.range: range's read tasks each need a whole free CPU, which small
    # nodes shared with fractional-CPU Train workers may never have (a deadlock seen in cluster/rehearse.py).
    rows = ray.data.from_items([{"id": row} for row in range(len(units))], override_num_blocks=min(len(units), 10_000))
    dataset = rows.map_batches(
        fn,
        batch_size=1,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        num_cpus=data_cpus / tasks,
        fn_kwargs={
            "plan_ref": [ray.put(plan)],
            "shard_root": shard_root,
            "skipped": skipped,
            "first_unit": units.start,
            **fn_kwargs,
        },
    )
    return dataset, skipped


def temporal_pair_dataset(
    data_cfg: DataConfig,
    source: Source | None = None,
    *,
    seed: int = 0,
    epochs: int = 1,
    rows: int | None = None,
    skip_rows: int = 0,
    skipped=None,
) -> Stream:
    """(target, reference) pairs of `frame_gap` list steps, same crop and flip on both.

    Columns: target, reference: 3 x S x S uint8 RGB (S = crop_size; the frozen teacher takes RGB,
    and on a GPU `stt.color.rgb_to_lab` on the device is cheaper than shipping floats). video (str),
    target_frame, reference_frame (raw frame numbers) and gap = their difference (int64).
    `source`: None reads `data_cfg.root` (see `resolve_source`). `epochs`, `rows`, `skip_rows`: which
    part of the endless epoch sequence to stream (`stream_units`). `skipped`: a `SkippedFrames`
    actor to count into (None: a new one), so rebuilt streams of one run share a count.
    """
    plan, shard_root, unit_rows = pair_plan(data_cfg, source or resolve_source(data_cfg.root))
    units = stream_units(unit_rows, seed, epochs, rows, skip_rows)
    dataset, skipped = _build(
        make_pairs, plan, shard_root, units, data_cfg.data_cpus, skipped, seed=seed, data_cfg=data_cfg
    )
    return Stream(dataset, skipped, plan.num_units, int(unit_rows.sum()))


def pair_plan(data_cfg: DataConfig, source: Source) -> tuple[Plan, str | None, np.ndarray]:
    """(plan, shard root or None, pairs per unit) of the temporal stream over `source`."""
    if data_cfg.frame_gap < 1:
        raise ValueError(f"data.frame_gap: expected at least 1 list step, got {data_cfg.frame_gap}")
    plan, shard_root = video_plan(source)
    if note := frame_spacing_note(plan, data_cfg.frame_gap, source.root):
        print(note)
    return plan, shard_root, _per_unit(plan, np.clip(plan.counts - data_cfg.frame_gap, 0, None))


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


def vfs_plan(source: Source) -> tuple[Plan, str | None, np.ndarray]:
    """(plan, shard root or None, pairs per unit) of the VFS stream over video `source`: one pair per
    video of at least 2 frames per epoch (VFS samples one clip per video per epoch, as mmaction's VideoDataset)."""
    plan, shard_root = video_plan(source)
    return plan, shard_root, _per_unit(plan, (plan.counts >= 2).astype(np.int64))


def vfs_pair_dataset(
    data_cfg: DataConfig,
    vfs_cfg: VFSConfig,
    source: Source | None = None,
    *,
    seed: int = 0,
    epochs: int = 1,
    rows: int | None = None,
    skip_rows: int = 0,
    skipped=None,
) -> Stream:
    """VFS's positives (paper 003): two frames of one video, each with its own augmentation (`unit_vfs_pairs`'s
    columns). `source`: None reads `data_cfg.root`. `epochs`, `rows`, `skip_rows`, `skipped`: as
    `temporal_pair_dataset`."""
    plan, shard_root, unit_rows = vfs_plan(source or resolve_source(data_cfg.root))
    units = stream_units(unit_rows, seed, epochs, rows, skip_rows)
    dataset, skipped = _build(
        make_vfs_pairs, plan, shard_root, units, data_cfg.data_cpus, skipped, seed=seed, vfs_cfg=vfs_cfg
    )
    return Stream(dataset, skipped, plan.num_units, int(unit_rows.sum()))


def view_plan(data_cfg: DataConfig, source: Source | None = None) -> tuple[Plan, str | None, np.ndarray]:
    """(plan, shard root or None, images per unit) of the spatial stream: `data.images`, else the frames of
    `data.root`."""
    if source is None:
        source = resolve_source(data_cfg.images, images=True) if data_cfg.images else resolve_source(data_cfg.root)
    plan = shard_plan(source.root)[1] if source.kind == "shards" else raw_plan(source, as_images=True)
    return plan, source.root if source.kind == "shards" else None, _per_unit(plan, plan.counts)


def local_stream(
    stream: str,
    data_cfg: DataConfig,
    spatial_cfg: SpatialConfig,
    *,
    seed: int,
    skip_rows: int,
    report: Callable[[list[str]], None],
    vfs_cfg: VFSConfig | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The same stream as `temporal_pair_dataset` ("temporal"), `spatial_view_dataset` ("spatial") or
    `vfs_pair_dataset` ("vfs"), endless and decoded in this process, without Ray Data: the same units in the
    same order with the same randomness, from the first unit not wholly inside the first `skip_rows` rows
    (a resumed run)."""
    temporal = stream == "temporal"
    if stream == "vfs":
        vfs_cfg = vfs_cfg or VFSConfig()
        plan, shard_root, unit_rows = vfs_plan(resolve_source(data_cfg.root))
    else:
        plan, shard_root, unit_rows = (
            pair_plan(data_cfg, resolve_source(data_cfg.root)) if temporal else view_plan(data_cfg)
        )
    first = stream_units(unit_rows, seed, rows=1, skip_rows=skip_rows).start
    for unit_id in itertools.count(first):  # unit ids name an endless sequence of epochs (`draw_unit`)
        if stream == "vfs":
            yield from unit_vfs_pairs(plan, unit_id, shard_root, seed, vfs_cfg, report)
        elif temporal:
            yield from unit_pairs(plan, unit_id, shard_root, seed, data_cfg, report)
        else:
            yield from unit_views(plan, unit_id, shard_root, seed, spatial_cfg.image_size, report)


def spatial_view_dataset(
    data_cfg: DataConfig,
    spatial_cfg: SpatialConfig,
    source: Source | None = None,
    *,
    seed: int = 0,
    epochs: int = 1,
    rows: int | None = None,
    skip_rows: int = 0,
    skipped=None,
) -> Stream:
    """Two MoCo v2 views of every image (stt.data.augment): view_q, view_k 3 x S x S float32
    ImageNet-normalised (S = spatial.image_size), image (str). `source`: None reads `data_cfg.images`,
    or the frames of `data_cfg.root` when that is empty. `epochs`, `rows`, `skip_rows`, `skipped`: as
    `temporal_pair_dataset`."""
    plan, shard_root, unit_rows = view_plan(data_cfg, source)
    units = stream_units(unit_rows, seed, epochs, rows, skip_rows)
    dataset, skipped = _build(
        make_views, plan, shard_root, units, data_cfg.data_cpus, skipped, seed=seed, image_size=spatial_cfg.image_size
    )
    return Stream(dataset, skipped, plan.num_units, int(unit_rows.sum()))


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


def _per_unit(plan: Plan, video_rows: np.ndarray) -> np.ndarray:
    """Rows per unit from rows per video (videos are stored unit by unit)."""
    return np.add.reduceat(video_rows, plan.unit_start[:-1]) if plan.num_units else np.zeros(0, dtype=np.int64)


def check_cpu_budget(
    num_workers: int, cpus_per_worker: float, data_cpus: float, cluster_cpus: float | None = None
) -> None:
    """Refuse a Train layout that leaves Ray Data less than `data_cpus` CPUs (it would wait forever)."""
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0) if cluster_cpus is None else cluster_cpus
    needed = num_workers * cpus_per_worker + data_cpus
    if needed > cluster_cpus:
        raise ValueError(
            f"{num_workers} Train worker(s) x {cpus_per_worker} CPU + data.data_cpus {data_cpus} = {needed} CPUs; "
            f"the cluster has {cluster_cpus}: expected Train to leave data_cpus free for the data stream"
        )
