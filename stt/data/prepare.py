"""python -m stt.data.prepare ytvos|images|davis SRC OUT: a raw layout -> Parquet shards of small JPEGs.

Why: a 720p YouTube-VOS JPEG decodes and resizes at about 100 frames/s per core, one already
shrunk to a short side of 320 at about 1,700 (DESIGN.md). So the conversion is done once, and the
training stream (stt.data.pipeline) reads the shards, locally or from s3://.

Shard format. `OUT/shard-00000.parquet`, ... hold one row per frame:

    video   string   video id (images: the image's path relative to SRC)
    frame   int32    frame number from the file name (images: 0)
    source  string   the source file, relative to SRC
    jpeg    binary   the frame resized to `short_side` (never enlarged), JPEG; EMPTY if the source
                     was unreadable: the row keeps the frame's place so list gaps stay honest,
                     and the stream counts it as a corrupt frame
    height, width  int32  of the stored JPEG (0 for an unreadable source)

Rows are in video order and a row group holds whole videos (about `frames_per_row_group` frames;
a longer video gets a row group of its own), so one row group is a self-contained unit from
which the stream samples pairs. Each shard's Parquet metadata (key `stt.shard`) records the
settings and the videos it holds; `OUT/_manifest.json`, written last, lists the finished shards.

Idempotent and resumable: a shard is written to `shard-XXXXX.parquet.tmp` and renamed when
complete, so a killed run leaves no half-written shard under a final name, and a re-run skips
every shard whose final file exists and holds what the plan says (and refuses one that holds
something else). SRC is a local folder (the layout readers are local); OUT is a local path or
a file://, s3:// or gs:// URI (stt.storage), never inside SRC.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from stt import command, storage
from stt.data.layouts import DAVIS, DatasetError, ImageFolder, YouTubeVOS, read_rgb_or_none
from stt.errors import UsageError
from stt.observe import with_progress
from stt.paths import check_apart

KINDS = ("ytvos", "images", "davis")
MANIFEST = "_manifest.json"
METADATA_KEY = b"stt.shard"
SCHEMA = pa.schema(
    [
        ("video", pa.string()),
        ("frame", pa.int32()),
        ("source", pa.string()),
        ("jpeg", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Video:
    """One video of a raw layout (an image is a one-frame video): frame numbers and files, in order."""

    name: str
    frames: tuple[int, ...]
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    kind: str
    short_side: int = 320
    quality: int = 90
    frames_per_row_group: int = 256
    row_groups_per_shard: int = 8

    def __post_init__(self):
        # (name, value, lowest, highest): a short side of 0 wrote 1 x 1-pixel shards, quality 500 was accepted
        for name, value, low, high in (
            ("--short-side", self.short_side, 32, 8192),
            ("--quality", self.quality, 1, 100),
            ("--frames-per-row-group", self.frames_per_row_group, 1, None),
            ("--row-groups-per-shard", self.row_groups_per_shard, 1, None),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < low
                or (high is not None and value > high)
            ):
                expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
                raise UsageError(f"{name}: expected {expected}, got {value!r}")


# --------------------------------------------------------------------------- listing raw layouts


def list_videos(kind: str, root, split: str = "train") -> list[Video]:
    """Every video (ytvos, davis) or image (images) under `root`, in a fixed order; empty videos dropped."""
    if kind == "ytvos":
        layout = YouTubeVOS(root, split=split)
        listing = [(v, layout.frame_paths(v)) for v in layout.videos]
    elif kind == "davis":
        layout = DAVIS(root, split=split)
        listing = [(s, layout.frame_paths(s)) for s in layout.sequences]
    elif kind == "images":
        root = Path(root)
        return [Video(p.relative_to(root).as_posix(), (0,), (str(p),)) for p in ImageFolder(root).paths]
    else:
        raise ValueError(f"dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    videos = []
    for name, paths in listing:
        if not paths:
            continue
        if not all(p.stem.isdigit() for p in paths):
            bad = next(p for p in paths if not p.stem.isdigit())
            raise DatasetError(f"{bad}: frame name is not a number; expected e.g. 00005.jpg")
        videos.append(Video(name, tuple(int(p.stem) for p in paths), tuple(str(p) for p in paths)))
    if not videos:
        raise DatasetError(f"{root}: no frames found; expected a {kind} layout with JPEG frames")
    return videos


def pack_videos(videos: list[Video], frames_per_group: int) -> list[list[Video]]:
    """Consecutive videos packed into groups of about `frames_per_group` frames, never splitting one."""
    if frames_per_group < 1:
        raise ValueError(f"frames_per_group: expected a positive count, got {frames_per_group}")
    groups: list[list[Video]] = []
    size = frames_per_group  # forces a new group for the first video
    for video in videos:
        if size + len(video.frames) > frames_per_group and size > 0:
            groups.append([])
            size = 0
        groups[-1].append(video)
        size += len(video.frames)
    return groups


def plan_shards(videos: list[Video], settings: Settings) -> list[list[list[Video]]]:
    """Shards -> row groups -> videos."""
    groups = pack_videos(videos, settings.frames_per_row_group)
    step = settings.row_groups_per_shard
    return [groups[i : i + step] for i in range(0, len(groups), step)]


# --------------------------------------------------------------------------- encoding


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """(H, W, 3) -> the same aspect with min(H, W) = short_side; smaller images are kept as they are."""
    height, width = image.shape[:2]
    if min(height, width) <= short_side:
        return image
    factor = short_side / min(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def _group_table(group: list[Video], src: Path, settings: Settings) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for video in group:
        for frame, path in zip(video.frames, video.paths):
            image = read_rgb_or_none(path)
            if image is None:
                jpeg, height, width = b"", 0, 0
            else:
                image = resize_short_side(image, settings.short_side)
                jpeg, (height, width) = encode_jpeg(image, settings.quality), image.shape[:2]
            columns["video"].append(video.name)
            columns["frame"].append(frame)
            columns["source"].append(Path(path).relative_to(src).as_posix())
            columns["jpeg"].append(jpeg)
            columns["height"].append(height)
            columns["width"].append(width)
    return pa.table(columns, schema=SCHEMA)


# --------------------------------------------------------------------------- shard files


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix (stt.storage: the schemes
    it supports, and an unreachable store as one line within its time limit)."""
    return storage.filesystem(uri)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _shard_record(groups: list[list[Video]], settings: Settings) -> dict:
    """What a shard must hold, [video, frame count] per row group; the resume check compares it
    with the file's metadata, and the stream plans its work from it."""
    return {"settings": asdict(settings), "row_groups": [[[v.name, len(v.frames)] for v in g] for g in groups]}


def _existing_record(fs: pafs.FileSystem, path: str) -> dict | None:
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_file(path) as handle:
        metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}


def write_shard(out: str, index: int, groups: list[list[Video]], src: str, settings: Settings) -> bool:
    """Write shard `index` unless its complete file is already there; True if it was written."""
    fs, base = filesystem(out)
    final = f"{base}/{shard_name(index)}"
    record = _shard_record(groups, settings)
    existing = _existing_record(fs, final)
    if existing is not None:
        if existing != record:
            raise ValueError(
                f"{out}/{shard_name(index)}: holds other videos or settings than this run would write; "
                "expected an OUT prepared from the same SRC with the same options (use a new OUT)"
            )
        return False
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(record).encode()})
    tmp = final + ".tmp"
    with fs.open_output_stream(tmp) as sink, pq.ParquetWriter(sink, schema) as writer:
        for group in groups:
            table = _group_table(group, Path(src), settings)
            writer.write_table(table, row_group_size=max(1, table.num_rows))  # one row group per call
    fs.move(tmp, final)  # a rename on local disks: the final name appears only when complete
    return True


def _corrupt_sources(fs: pafs.FileSystem, path: str) -> list[str]:
    with fs.open_input_file(path) as handle:
        table = pq.read_table(handle, columns=["source", "height"])
    heights = table.column("height").to_numpy()
    return [table.column("source")[int(i)].as_py() for i in np.flatnonzero(heights == 0)]


def prepare(kind: str, src, out: str, settings: Settings | None = None, split: str = "train", workers: int = 1) -> dict:
    """Convert the `kind` layout at `src` into shards under `out`; returns the manifest (also written)."""
    settings = settings or Settings(kind)
    if settings.kind != kind:
        raise ValueError(f"settings.kind is {settings.kind!r}; expected {kind!r}")
    if workers < 1:
        raise UsageError(f"--workers: expected at least 1, got {workers}")
    src = str(Path(src).resolve())
    check_apart("OUT", out, {"SRC": src})  # shards written into the raw tree would become part of it
    check_same_preparation(out, kind, src, split, settings)
    shards = plan_shards(list_videos(kind, src, split), settings)
    fs, base = filesystem(out)
    fs.create_dir(base, recursive=True)
    jobs = [(out, i, groups, src, settings) for i, groups in enumerate(shards)]
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        # Both maps yield in shard order as the shards finish (the built-in one lazily, one at a time).
        finished = pool.map(write_shard, *zip(*jobs)) if pool is not None else map(write_shard, *zip(*jobs))
        written = list(with_progress(finished, "stt.prepare", "shard", total=len(jobs)))
    corrupt = [s for i in range(len(shards)) for s in _corrupt_sources(fs, f"{base}/{shard_name(i)}")]
    manifest = {
        "format": 1,
        "kind": kind,
        "split": split,
        "source": src,
        "settings": asdict(settings),
        "frames": sum(len(v.frames) for groups in shards for g in groups for v in g),
        "videos": sum(len(g) for groups in shards for g in groups),
        "corrupt_sources": corrupt,
        "shards": [{"file": shard_name(i), **_shard_record(groups, settings)} for i, groups in enumerate(shards)],
    }
    manifest_tmp = f"{base}/{MANIFEST}.tmp"
    with fs.open_output_stream(manifest_tmp) as sink:
        sink.write(json.dumps(manifest, indent=1).encode())
    fs.move(manifest_tmp, f"{base}/{MANIFEST}")
    print(
        f"stt.prepare: {out}: {sum(written)} shard(s) written, {len(shards) - sum(written)} already done, "
        f"{manifest['frames']} frames of {manifest['videos']} {'images' if kind == 'images' else 'videos'}, "
        f"{len(corrupt)} unreadable, {time.perf_counter() - started:.1f} s"
    )
    if corrupt:
        print(f"stt.prepare: {unreadable_line(src, corrupt)}")
    return manifest


def unreadable_line(src: str, corrupt: list[str], shown: int = 5) -> str:
    """The unreadable source frames, the first `shown` by path: kept as empty rows (the stream skips them)."""
    paths = ", ".join(str(Path(src) / source) for source in corrupt[:shown])
    more = f" and {len(corrupt) - shown} more (all in {MANIFEST}'s corrupt_sources)" if len(corrupt) > shown else ""
    return f"unreadable frames, kept as empty rows the training stream skips: {paths}{more}"


def check_same_preparation(out: str, kind: str, src: str, split: str, settings: Settings) -> None:
    """Refuse to prepare into a finished folder of another preparation: its shards would be kept (they
    hold the same video names) under a manifest naming the new source."""
    if not is_shard_folder(out):
        return
    done = read_manifest(out)
    asked = {"kind": kind, "source": src, "split": split, "settings": asdict(settings)}
    differing = [key for key, value in asked.items() if done.get(key) != value]
    if differing:
        was = ", ".join(f"{key}={done.get(key)!r}" for key in differing)
        raise ValueError(
            f"{out}: holds shards prepared with {was}; expected the same {', '.join(differing)}, "
            "or an empty folder (give a new OUT, or delete this one to rebuild)"
        )


def read_manifest(uri: str) -> dict:
    """The manifest of a finished shard folder; refuses a folder whose preparation did not finish."""
    fs, base = filesystem(uri)
    path = f"{base}/{MANIFEST}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DatasetError(f"{uri}/{MANIFEST}: missing; expected a shard folder finished by python -m stt.data.prepare")
    with fs.open_input_stream(path) as handle:
        try:
            manifest = json.loads(handle.read())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{uri}/{MANIFEST}: not valid JSON ({err})") from err
    if manifest.get("format") != 1:
        raise DatasetError(f"{uri}/{MANIFEST}: format {manifest.get('format')!r}; expected 1")
    return manifest


def is_shard_folder(uri: str) -> bool:
    fs, base = filesystem(uri)
    return storage.contact(uri, lambda: fs.get_file_info(f"{base}/{MANIFEST}")).type == pafs.FileType.File


def read_row_group(uri: str, file: str, index: int, columns: list[str] | None = None) -> pa.Table:
    """Row group `index` of shard `file` in the folder `uri`."""
    fs, base = filesystem(uri)
    with fs.open_input_file(f"{base}/{file}") as handle:
        return pq.ParquetFile(handle).read_row_group(index, columns=columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stt.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS, help="layout of SRC: YouTube-VOS train, an image folder, DAVIS-2017")
    parser.add_argument("src", help="the raw dataset root (local)")
    parser.add_argument("out", help="shard folder: local path or URI (s3://bucket/prefix)")
    parser.add_argument("--split", default="train", help="YouTube-VOS / DAVIS split (default: train)")
    parser.add_argument("--short-side", type=int, default=320, help="resize so the short side is this (default 320)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored frames (default 90)")
    parser.add_argument("--frames-per-row-group", type=int, default=256)
    parser.add_argument("--row-groups-per-shard", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    settings = Settings(args.kind, args.short_side, args.quality, args.frames_per_row_group, args.row_groups_per_shard)
    prepare(args.kind, args.src, args.out, settings, split=args.split, workers=args.workers)


if __name__ == "__main__":
    sys.exit(command.run(main, "stt.prepare"))
