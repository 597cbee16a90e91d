"""The least time a whole DAVIS evaluation can take on this CPU in fp32, from the work it cannot skip (issue 25).

    python bench/evaluation_floor.py --davis-root ../shared/data/davis-real [--set val] [--checkpoint random:0]
                                     [--threads 2] [--iters 3] [overrides ...]

Counts the floating-point work of `python -m stt.evaluate davis --set SET` with the same checkpoint and overrides,
for every frame of the split at its own size:
  network      stt.features.FeatureExtractor on the frame (torch's FlopCounterMode), as the evaluator extracts it;
  propagation  per target frame, one C-channel dot product per (target cell, allowed context cell): every cell of
               a windowed context frame's window that lies on the grid, every cell of an unwindowed frame (the
               rule of stt.propagation, context_indices and first_windowed_frame; every cell of every frame for
               per-frame aggregation normalised before the mask, over the whole frame); and, for reference, what the
               windowed kernel chosen for the frame scores (stt.propagation.choose_window_kernel: whole tiles of
               (t + 2R)^2 cells per target, the chunk's rows padded to whole tiles).
Then divides by the better of two fp32 rates measured on `--threads` threads, the matrix product's
(plan_floor.matmul_rate) and the network's own (a batch of the evaluator's size): the least wall any fp32
implementation of this evaluation takes here, with every product at that rate and reading, top-k, upsampling and
scoring free. Prints one table; not a test.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from PIL import Image
from plan_floor import flops_of, matmul_rate, timed

from stt.allocator import retain_freed_memory
from stt.config import load_config
from stt.data.layouts import DAVIS
from stt.evaluate import task_config
from stt.features import FeatureExtractor
from stt.propagation import choose_window_kernel, context_indices, window_mask
from stt.propagation.rule import first_windowed_frame


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--davis-root", required=True, help="DAVIS-2017 root")
    parser.add_argument("--set", default="val", help="ImageSets/2017/<set>.txt (default val)")
    parser.add_argument("--checkpoint", default="random:0", help="feature source, as stt.evaluate's --checkpoint")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: torch's)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls of each after one warm-up call")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as stt.evaluate's")
    return parser


def propagation_products(frames: int, grid: tuple[int, int], channels: int, cfg) -> tuple[int, int]:
    """Multiply-adds of one video's propagation (`frames` frames on an h x w grid of `channels`): the exact
    window's, and the windowed kernel's (stt.propagation.windowed.predict_windowed's chunks and kernel)."""
    h, w = grid
    cells = h * w
    in_window = int(window_mask(h, w, cfg.radius, cfg.window).sum()) if cfg.radius else cells * cells
    # per-frame aggregation normalised before the mask: the softmax over the whole frame needs every product
    whole_frame_norm = cfg.aggregation == "per-frame" and cfg.per_frame_norm == "before-mask"
    exact = scored = 0
    for t in range(1, frames):
        n = len(context_indices(t, cfg.context, cfg.repeat_first_frame))
        windowed = n - first_windowed_frame(cfg, n)
        exact += (n - windowed) * cells * cells + windowed * (cells * cells if whole_frame_norm else in_window)
        scored += (n - windowed) * cells * cells
        if windowed:
            plan = choose_window_kernel(grid, windowed, channels, cfg.radius, cfg.chunk_size, tile=8)
            if whole_frame_norm and not (plan.name == "band" and plan.cells_per_target == cells):
                scored += windowed * cells * cells  # the normaliser's own products (a whole-frame band has them)
            for y0 in range(0, h, plan.rows_per_chunk):
                rows = min(plan.rows_per_chunk, h - y0)
                if plan.name == "tile":
                    rows = math.ceil(rows / plan.tile) * plan.tile
                scored += windowed * rows * plan.scored_width * plan.cells_per_target
    return exact * channels, scored * channels


def network_per_frame(extractor: FeatureExtractor, size: tuple[int, int], batch: int, iters: int) -> tuple:
    """FLOP and seconds per frame of `size` (H x W) in a batch of `batch`, as the evaluator extracts them, and
    the feature grid and channels."""
    frames = np.zeros((batch, *size, 3), dtype=np.uint8)
    features = extractor(frames)
    flops, seconds = flops_of(lambda: extractor(frames)), timed(lambda: extractor(frames), iters)
    return flops / batch, seconds / batch, tuple(features.shape[-2:]), features.shape[1]


def main(args: argparse.Namespace) -> None:
    retain_freed_memory()  # as python -m stt.evaluate runs (stt.allocator): the activations are not paged in afresh
    torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides)
    extractor = FeatureExtractor(args.checkpoint, cfg.model, cfg.eval)
    cfg = task_config(cfg, "davis", extractor.stride)
    dataset = DAVIS(args.davis_root, split=args.set)

    per_size = {}  # (height, width) -> (network FLOP, measured s, grid, channels) of one frame
    network = network_s = exact = scored = 0.0
    frames_total = 0
    for seq in dataset.sequences:
        paths = dataset.frame_paths(seq)
        size = Image.open(paths[0]).size[::-1]  # H x W (a DAVIS sequence's frames share one size)
        if size not in per_size:
            per_size[size] = network_per_frame(extractor, size, cfg.eval.batch_size, args.iters)
        flops, seconds, grid, channels = per_size[size]
        network, network_s = network + len(paths) * flops, network_s + len(paths) * seconds
        video_exact, video_scored = propagation_products(len(paths), grid, channels, cfg.propagation)
        exact, scored, frames_total = exact + 2 * video_exact, scored + 2 * video_scored, frames_total + len(paths)
    matmul = matmul_rate(args.iters)
    rate = max(matmul, network / network_s)  # oneDNN's convolutions may beat the matrix product: the best rate seen

    p = cfg.propagation
    print(
        f"DAVIS {args.set}: {len(dataset.sequences)} sequences, {frames_total} frames; {args.checkpoint} "
        f"({extractor.model_cfg.arch}, {cfg.eval.layer} at stride {extractor.stride}, short side "
        f"{cfg.eval.max_short_side}); propagation {p.aggregation}, top-{p.topk}, context {p.context}, "
        f"radius {p.radius:g} {p.window}; {args.threads} thread(s), fp32 GFLOP/s: matmul {matmul / 1e9:.0f}, "
        f"network {network / network_s / 1e9:.0f}"
    )
    print(f"| work | TFLOP | s at {rate / 1e9:.0f} GFLOP/s | s measured |")
    print("|---|---|---|---|")
    print(f"| network | {network / 1e12:.1f} | {network / rate:.0f} | {network_s:.0f} |")
    print(f"| propagation, exact window | {exact / 1e12:.1f} | {exact / rate:.0f} | |")
    print(f"| propagation, as the kernel scores it | {scored / 1e12:.1f} | {scored / rate:.0f} | |")
    floor = network + exact
    print(f"| **floor: network + exact window** | {floor / 1e12:.1f} | **{floor / rate:.0f}** | |")
    print(f"(at the better fp32 rate measured on these threads: the {'matmul' if rate == matmul else 'network'}'s)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
