"""The training streams on Ray Data: (target, reference) frame pairs for the temporal stage, two augmented
views of an image for the spatial stage, and VFS's frame pairs; `STREAMS` is the one registry of them.

How a stream is built. Its source is planned into units of whole videos, and a stream is a range of unit ids
naming an endless sequence of epochs (stt.data.plans). The dataset is one row per unit id of that range ->
`map_batches` of Ray tasks (at most `data_cpus` CPUs at once) that turn one unit id into its rows
(`stream_dataset`), so nothing is ever materialised: Ray Data's streaming executor pulls units as the trainer
consumes batches, and its back-pressure bounds the memory. The plan sits once in the object store. Shards are
read one row group at a time by the tasks themselves rather than with `ray.data.read_parquet`, whose blocks may
cut a video in two; a row group is exactly the unit rows are drawn from. Tasks rather than actors: Ray reuses
warm worker processes for them. `local_stream` is the same stream decoded in the calling process.

Pairs. Every (i, i + frame_gap) of a video's frame list, i.e. `frame_gap` list steps (YouTube-VOS
lists every 5th raw frame, so the default 1 is 5 raw frames): the LATER frame is the target, the
earlier the reference (MAST reconstructs a frame from earlier ones). Both get one random resized
crop and one flip (stt.data.transforms). The videos of a unit are interleaved at random, so a
batch mixes videos; each video keeps only `frame_gap + 1` decoded frames alive and decodes each
frame once. Everything random is drawn from (seed, epoch, unit), so a stream is reproducible
whatever the scheduling (the order of its rows is not: Ray Data does not preserve order).

VFS pairs (stream "vfs", paper 003): one pair per video per epoch, two frames drawn by
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
from typing import Any, Callable, Iterator

import numpy as np
import ray
import torch

from stt.config import DataConfig, SpatialConfig, VFSConfig
from stt.data.augment import FramePairViews, TwoViews
from stt.data.plans import Clip, Plan, Source, draw_unit, pair_plan, stream_units, vfs_plan, view_plan
from stt.data.transforms import pair_crops, to_chw

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


# --------------------------------------------------------------------------- the per-unit work (no Ray)


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


# --------------------------------------------------------------------------- the streams


@dataclass(frozen=True)
class StreamKind:
    """One training stream: how its source is planned into units, what one unit yields, and which settings the
    unit reads (`settings(data, spatial, vfs)`: passed to `unit` as is)."""

    plan: Callable[[DataConfig, Source | None], tuple[Plan, str | None, np.ndarray]]
    unit: Callable[..., Iterator[dict[str, np.ndarray]]]  # (plan, unit id, shard root, seed, settings, report)
    settings: Callable[[DataConfig, SpatialConfig, VFSConfig], Any]
    images: bool = False  # reads `data.images` when that is set (else the frames of `data.root`)


STREAMS: dict[str, StreamKind] = {
    # (target, reference) pairs: target, reference 3 x S x S uint8 RGB (S = data.crop_size; the frozen teacher
    # takes RGB, and on a GPU `stt.color.rgb_to_lab` on the device is cheaper than shipping floats), video (str),
    # target_frame, reference_frame (raw frame numbers) and gap = their difference (int64)
    "temporal": StreamKind(pair_plan, unit_pairs, lambda data, spatial, vfs: data),
    # two MoCo v2 views of every image: view_q, view_k 3 x S x S float32 ImageNet-normalised (S =
    # spatial.image_size), image (str)
    "spatial": StreamKind(view_plan, unit_views, lambda data, spatial, vfs: spatial.image_size, images=True),
    # VFS's positives: two frames of one video, each with its own augmentation (`unit_vfs_pairs`'s columns)
    "vfs": StreamKind(vfs_plan, unit_vfs_pairs, lambda data, spatial, vfs: vfs),
}


def make_rows(
    batch: dict[str, np.ndarray],
    *,
    stream: str,
    plan_ref: list,
    shard_root: str | None,
    seed: int,
    skipped,
    first_unit: int,
    settings: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: row ids (column `id`; unit id = first_unit + id) -> batches of `stream`'s rows."""
    plan = ray.get(plan_ref[0])  # in a list, so Ray passes the reference and the array stays zero-copy
    unit, report = STREAMS[stream].unit, lambda corrupt: report_corrupt(skipped, corrupt)
    for row_id in batch["id"]:
        yield from unit(plan, first_unit + int(row_id), shard_root, seed, settings, report)


def stream_dataset(
    stream: str,
    data_cfg: DataConfig,
    spatial_cfg: SpatialConfig | None = None,
    *,
    vfs_cfg: VFSConfig | None = None,
    source: Source | None = None,
    seed: int = 0,
    epochs: int = 1,
    rows: int | None = None,
    skip_rows: int = 0,
    skipped=None,
) -> Stream:
    """The Ray Data stream `stream` (a key of STREAMS; its columns are described there).

    `source`: None reads the stream's default (`data.root`; the spatial stream `data.images` when set).
    `epochs`, `rows`, `skip_rows`: which part of the endless epoch sequence to stream (stt.data.plans.stream_units).
    `skipped`: a `SkippedFrames` actor to count into (None: a new one), so rebuilt streams of one run share a count.
    """
    kind = STREAMS[stream]
    plan, shard_root, unit_rows = kind.plan(data_cfg, source)
    units = stream_units(unit_rows, seed, epochs, rows, skip_rows)
    if data_cfg.data_cpus <= 0:
        raise ValueError(f"data.data_cpus: expected a positive CPU count, got {data_cfg.data_cpus}")
    tasks = max(1, int(data_cfg.data_cpus))
    skipped = skipped or SkippedFrames.remote()
    # from_items, not ray.data.range: range's read tasks each need a whole free CPU, which small
    # nodes shared with fractional-CPU Train workers may never have (a deadlock seen in cluster/rehearse.py).
    ids = ray.data.from_items([{"id": row} for row in range(len(units))], override_num_blocks=min(len(units), 10_000))
    dataset = ids.map_batches(
        make_rows,
        batch_size=1,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        num_cpus=data_cfg.data_cpus / tasks,
        fn_kwargs={
            "stream": stream,
            "plan_ref": [ray.put(plan)],
            "shard_root": shard_root,
            "seed": seed,
            "skipped": skipped,
            "first_unit": units.start,
            "settings": kind.settings(data_cfg, spatial_cfg or SpatialConfig(), vfs_cfg or VFSConfig()),
        },
    )
    return Stream(dataset, skipped, plan.num_units, int(unit_rows.sum()))


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
    """The same stream as `stream_dataset(stream, ...)`, endless and decoded in this process, without Ray Data:
    the same units in the same order with the same randomness, from the first unit not wholly inside the first
    `skip_rows` rows (a resumed run)."""
    kind = STREAMS[stream]
    plan, shard_root, unit_rows = kind.plan(data_cfg, None)
    settings = kind.settings(data_cfg, spatial_cfg, vfs_cfg or VFSConfig())
    first = stream_units(unit_rows, seed, rows=1, skip_rows=skip_rows).start
    for unit_id in itertools.count(first):  # unit ids name an endless sequence of epochs (`draw_unit`)
        yield from kind.unit(plan, unit_id, shard_root, seed, settings, report)


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
