"""Benchmark one propagation step at DAVIS size: dense vs windowed, time per frame and peak memory.

Each target frame is predicted from a full context (the first frame + `--context` previous
frames) of synthetic features: a smooth random field that drifts a little from frame to frame,
plus noise, so that matches are meaningful. Prints one row per implementation and the agreement
of their label maps (argmax) with the dense reference.

    python bench/propagation.py                        # CPU, 2 target frames
    python bench/propagation.py --device cuda --frames 20

Peak memory is what the prediction allocates on top of its inputs: on CUDA from
torch.cuda.max_memory_allocated, on the CPU from the process's peak resident set (Linux
VmHWM, reset through /proc/self/clear_refs before each implementation runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from stt.config import PropagationConfig
from stt.propagation import default_radius, labels_to_mask, predict_dense, predict_windowed


def get_args_parser() -> argparse.ArgumentParser:
    defaults = PropagationConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--frames", type=int, default=2, help="target frames timed (after one warm-up frame)")
    parser.add_argument("--grid", type=int, nargs=2, default=(60, 107), metavar=("H", "W"), help="feature grid")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--labels", type=int, default=4, help="labels, background included")
    parser.add_argument("--context", type=int, default=defaults.context, help="previous frames besides the first")
    parser.add_argument("--radius", type=float, default=default_radius("davis", 8))
    parser.add_argument("--topk", type=int, default=defaults.topk)
    parser.add_argument("--aggregation", default=defaults.aggregation, help="overall | per-frame")
    parser.add_argument("--per-frame-norm", default=defaults.per_frame_norm, help="before-mask | after-mask")
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    parser.add_argument(
        "--tile", type=int, default=8, help="target tile side of the windowed implementation (many channels)"
    )
    parser.add_argument("--implementations", nargs="+", default=["dense", "windowed"], choices=["dense", "windowed"])
    parser.add_argument("--seed", type=int, default=0)
    return parser


def synthetic_video(num_frames: int, channels: int, grid: tuple[int, int], num_labels: int, seed: int):
    """Unit-norm features num_frames x C x h x w and one-hot labels num_frames x L x h x w."""
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    field = F.interpolate(
        torch.randn(1, channels, h // 4 + 2, w // 4 + 2, generator=generator), size=(h + 8, w + 8), mode="bilinear"
    )[0]
    shifts = torch.randint(0, 9, (num_frames, 2), generator=generator)
    frames = torch.stack([field[:, dy : dy + h, dx : dx + w] for dy, dx in shifts.tolist()])
    features = F.normalize(frames + 0.3 * torch.randn(frames.shape, generator=generator), dim=1)
    regions = F.interpolate(
        torch.randn(1, num_labels, h // 8 + 2, w // 8 + 2, generator=generator), size=(h, w), mode="bilinear"
    )[0]
    labels = F.one_hot(regions.argmax(0), num_labels).permute(2, 0, 1).float()
    return features, labels.expand(num_frames, -1, -1, -1).contiguous()


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Bytes allocated at the peak of a block, above what was allocated when it began."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start = _read_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak_bytes = _read_status_kib("VmHWM") * 1024 - self.start


def time_frames(predict, features, labels, num_context: int, frames: int, device: torch.device):
    """Predict frames num_context .. num_context + frames (plus a warm-up); ms per frame and label maps."""

    def step(t):
        context = [0, *range(t - num_context + 1, t)]
        return predict(features[context], labels[context], features[t])

    step(num_context)  # warm-up: allocator, kernels, thread pools
    timings, masks = [], []
    for t in range(num_context, num_context + frames):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        prediction = step(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append((time.perf_counter() - start) * 1000)
        masks.append(labels_to_mask(prediction))
    return statistics.median(timings), torch.stack(masks)


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    cfg = replace(
        PropagationConfig(),
        context=args.context,
        radius=args.radius,
        topk=args.topk,
        aggregation=args.aggregation,
        per_frame_norm=args.per_frame_norm,
        chunk_size=args.chunk_size,
    )
    num_context = args.context + 1
    features, labels = synthetic_video(
        num_context + args.frames, args.channels, tuple(args.grid), args.labels, args.seed
    )
    features, labels = features.to(device), labels.to(device)
    h, w = args.grid
    predictors = {
        "dense": lambda c, y, g: predict_dense(c, y, g, cfg),
        "windowed": lambda c, y, g: predict_windowed(c, y, g, cfg, args.tile),
    }

    print(
        f"device {device} ({torch.get_num_threads()} CPU threads), grid {h}x{w}, C {args.channels}, "
        f"context 1+{args.context}, radius {cfg.radius:g} {cfg.window}, top-{cfg.topk}, {cfg.aggregation}, "
        f"chunk {cfg.chunk_size}, tile {args.tile}, fp32, {args.frames} timed frames"
    )
    print(f"{'implementation':<15}{'ms/frame':>12}{'peak MiB':>12}{'argmax agree %':>17}")
    reference = None
    for name in args.implementations:
        with torch.no_grad(), PeakMemory(device) as memory:
            ms, masks = time_frames(predictors[name], features, labels, num_context, args.frames, device)
        reference = masks if reference is None else reference
        agreement = (masks == reference).float().mean().item() * 100
        print(f"{name:<15}{ms:>12.1f}{memory.peak_bytes / 2**20:>12.0f}{agreement:>17.3f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
