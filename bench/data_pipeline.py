"""Temporal pairs per second per CPU core: Ray Data from shards vs from raw JPEG folders vs a plain
torch DataLoader, for small (256-px tall) and 1280x720 source frames. Not a test; prints a table.

    python bench/data_pipeline.py [--cpus 2] [--videos 8] [--frames 20] [--sizes 256x455,720x1280]

Every path does the same work per pair (decode two frames, one random resized crop + flip to
256 x 256 for both, uint8 3 x 256 x 256 out); frames are decoded once per video in the streams
and twice per pair in the DataLoader (a map-style dataset of pairs). "inline" runs the stream's
own batch function in this process on one core with no Ray: its pairs per CPU-second is the
per-core cost, unaffected by other load on the machine. Target (issue): >= 150 pairs/s per core
from shards.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import ray
import torch
from PIL import Image
from skimage import data as skdata

from stt.config import DataConfig
from stt.data import prepare as prep
from stt.data.layouts import read_rgb_or_none
from stt.data.pipeline import stream_dataset, unit_pairs
from stt.data.plans import Source, raw_plan, shard_plan
from stt.data.transforms import pair_crops


def write_videos(root: Path, videos: int, frames: int, size: tuple[int, int]) -> None:
    """YouTube-VOS-style folders of natural-image frames panning slowly (JPEG quality 90)."""
    sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    height, width = size
    for v in range(videos):
        base = cv2.resize(sources[v % len(sources)], (width + frames * 4, height), interpolation=cv2.INTER_LINEAR)
        folder = root / "train" / "JPEGImages" / f"video{v:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            Image.fromarray(base[:, 4 * i : 4 * i + width]).save(folder / f"{5 * i:05d}.jpg", quality=90)


class PairFolder(torch.utils.data.Dataset):
    """The plain baseline: every (i, i + 1) pair of a raw layout, decoded and cropped per item."""

    def __init__(self, root: Path, cfg: DataConfig):
        self.cfg = cfg
        videos = prep.list_videos("ytvos", root)
        self.pairs = [(v.paths[i + 1], v.paths[i]) for v in videos for i in range(len(v.paths) - 1)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        target, reference = (read_rgb_or_none(p) for p in self.pairs[index])
        rng = np.random.default_rng(index)
        t, r = pair_crops(target, reference, rng, self.cfg.crop_size, self.cfg.crop_scale, self.cfg.crop_ratio)
        return torch.from_numpy(t).permute(2, 0, 1), torch.from_numpy(r).permute(2, 0, 1)


def inline(plan, shard_root, cfg) -> tuple[int, float, float]:
    """(pairs, wall s, CPU s) of the stream's per-unit work over every unit, in this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    pairs = 0
    for unit in range(plan.num_units):
        for batch in unit_pairs(plan, unit, shard_root, 0, cfg, report=list.clear):
            pairs += len(batch["target"])
    return pairs, time.perf_counter() - wall, time.process_time() - cpu


def ray_stream(source: Source, cfg: DataConfig, epochs: int) -> tuple[int, float]:
    stream = stream_dataset("temporal", cfg, source=source, epochs=epochs)
    batches = iter(stream.dataset.iter_batches(batch_size=32, batch_format="numpy"))
    pairs = len(next(batches)["target"])  # the first batch pays for worker start-up: not timed
    started, pairs = time.perf_counter(), 0
    for batch in batches:
        pairs += len(batch["target"])
    return pairs, time.perf_counter() - started


def torch_loader(root: Path, cfg: DataConfig, workers: int) -> tuple[int, float]:
    loader = torch.utils.data.DataLoader(
        PairFolder(root, cfg), batch_size=32, shuffle=True, num_workers=workers, persistent_workers=False
    )
    batches = iter(loader)
    next(batches)
    started, pairs = time.perf_counter(), 0
    for target, _ in batches:
        pairs += len(target)
    return pairs, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for the streams and DataLoader workers")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="passes of the Ray streams")
    parser.add_argument("--sizes", default="256x455,720x1280", help="source frame sizes, HxW, comma-separated")
    parser.add_argument("--skip", default="", help="comma-separated of: inline,ray,torch")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = DataConfig(data_cpus=float(args.cpus))
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = []
        for size in args.sizes.split(","):
            height, width = (int(s) for s in size.split("x"))
            raw, shards = Path(tmp) / f"raw-{size}", str(Path(tmp) / f"shards-{size}")
            write_videos(raw, args.videos, args.frames, (height, width))
            started = time.perf_counter()
            prep.prepare("ytvos", raw, shards, prep.Settings("ytvos"), workers=args.cpus)
            rate = args.videos * args.frames / (time.perf_counter() - started)
            rows.append((size, f"prepare ({args.cpus} processes, frames/s)", rate, ""))
            sources.append((size, raw, shards))
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="error")  # after prepare's forks
        ray.data.DataContext.get_current().enable_progress_bars = False
        for size, raw, shards in sources:
            if "inline" not in skip:
                for name, plan, root in (
                    ("shards", shard_plan(shards)[1], shards),
                    ("raw", raw_plan(Source("ytvos", str(raw))), None),
                ):
                    pairs, wall, cpu = inline(plan, root, cfg)
                    rows.append(
                        (size, f"inline {name} (1 core, no Ray)", pairs / wall, f"{pairs / cpu:.0f} pairs/CPU-s")
                    )
            if "ray" not in skip:
                for name, source in (("shards", Source("shards", shards)), ("raw", Source("ytvos", str(raw)))):
                    pairs, wall = ray_stream(source, cfg, args.epochs)
                    rows.append((size, f"Ray Data {name} ({args.cpus} CPUs)", pairs / wall / args.cpus, "per core"))
            if "torch" not in skip:
                pairs, wall = torch_loader(raw, cfg, args.cpus)
                rows.append((size, f"DataLoader raw ({args.cpus} workers)", pairs / wall / args.cpus, "per core"))
        ray.shutdown()
    print(f"\n{'source':>10}  {'path':<34} {'pairs/s':>9}  note")
    for size, path, rate, note in rows:
        print(f"{size:>10}  {path:<34} {rate:9.1f}  {note}")


if __name__ == "__main__":
    main()
