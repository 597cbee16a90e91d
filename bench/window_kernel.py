"""Would a hand-written exact-window kernel beat stt.propagation's tile kernel on this CPU? (issue 25)

    python bench/window_kernel.py [--grid 60 107] [--channels 256] [--context 20] [--radius 12] [--rows 8]
                                  [--threads N] [--iters 7]

Builds bench/window_kernel.cpp with torch.utils.cpp_extension (a C++ compiler, and ninja: `pip install -e
'.[bench]'`; about a minute the first time, cached after), checks that its logits are the bits of
stt.propagation.kernels.window_logits_by_shift on small shapes with edges, then times it against
window_logits_by_tile (what stt.propagation runs at many channels, 8 x 8 tiles) on chunks of `--rows` target rows
in the middle of the grid, `--context` context frames of random features. The two kernels' calls alternate, so
a busy neighbour slows both. Prints, per kernel, the median milliseconds per chunk, the products it scores per
window product (the D x D square of each target) and its rate on window products; and what laying the frames out
for the hand-written kernel costs per frame. Not a test; the kernel is not part of the package.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stt.propagation.kernels import window_logits_by_shift, window_logits_by_tile

TARGETS = 6  # G, the micro-tile's targets (kTargets in the .cpp)
BLOCK = 16  # context cells per block, and zero columns either side of each context row (kBlock)
TILE = 8  # the tile kernel's side, as stt.propagation's default


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=2, default=(60, 107), metavar=("H", "W"), help="feature grid")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--context", type=int, default=20, help="context frames scored per chunk")
    parser.add_argument("--radius", type=int, default=12, help="R: the window is (2R + 1)^2 cells")
    parser.add_argument("--rows", type=int, default=8, help="target rows per chunk (the tile kernel's at 480p)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=7, help="timed rounds, after one warm-up round")
    return parser


def build():
    """The compiled kernel module (cached by torch under ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import load

    source = Path(__file__).with_name("window_kernel.cpp")
    return load(
        "stt_bench_window_kernel",
        [str(source)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


def kernel_layouts(context: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hand-written kernel's layouts: context n x C x h x w -> n x C x h x (16 + w + 16) in n x h x C x W memory
    (each row's channels together, zero columns around); query C x h x w -> h x ceil(w / G) x C x G."""
    channels, h, w = query.shape
    groups = math.ceil(w / TARGETS)
    rows = F.pad(context, (BLOCK, BLOCK)).transpose(1, 2).contiguous().transpose(1, 2)
    packed = F.pad(query, (0, groups * TARGETS - w)).view(channels, h, groups, TARGETS).permute(1, 2, 0, 3)
    return rows, packed.contiguous()


def native_logits(module, context: torch.Tensor, query: torch.Tensor, y0: int, y1: int, reach: int, out=None):
    """Logits n x r x w x D*D, as window_logits_by_shift's, from frames in `kernel_layouts`."""
    n, w, size = context.shape[0], context.shape[-1] - 2 * BLOCK, 2 * reach + 1
    out = torch.empty(n, y1 - y0, w, size, size) if out is None else out
    module.window_logits(context, query, y0, y1, reach, out)
    return out.flatten(3)


def check_equal(module) -> None:
    """Exits with one line unless the kernel's logits equal the shift kernel's bit for bit."""
    generator = torch.Generator().manual_seed(0)
    # n, C, h, w, R, y0, y1: edges on every side, a reach past the 16 padded columns, a grid narrower than G
    shapes = [(2, 8, 9, 13, 2, 0, 9), (3, 33, 20, 31, 5, 3, 11), (2, 256, 14, 40, 12, 0, 14), (1, 64, 7, 5, 3, 2, 5)]
    shapes += [(2, 16, 30, 50, 12, 10, 13), (1, 8, 10, 40, 20, 0, 10)]
    for n, channels, h, w, reach, y0, y1 in shapes:
        context = torch.randn(n, channels, h, w, generator=generator)
        query = torch.randn(channels, h, w, generator=generator)
        expected, _, _ = window_logits_by_shift(context, query, y0, y1, float(reach), "square")
        got = native_logits(module, *kernel_layouts(context, query), y0, y1, reach)
        if not torch.equal(got, expected):
            difference = (got - expected).abs().max().item()
            shape = f"n, C, h, w, R, y0, y1 = {n, channels, h, w, reach, y0, y1}"
            sys.exit(f"window_kernel.cpp: logits differ from window_logits_by_shift by up to {difference:g} at {shape}")
    print(f"logits bit-equal to window_logits_by_shift on {len(shapes)} shapes")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    module = build()
    print(f"built in {time.perf_counter() - started:.0f} s (cached after the first time)")
    check_equal(module)

    (h, w), channels, n, reach, rows = args.grid, args.channels, args.context, args.radius, args.rows
    size = 2 * reach + 1
    context, query = torch.randn(n, channels, h, w), torch.randn(channels, h, w)
    started = time.perf_counter()
    context_rows, query_packed = kernel_layouts(context, query)
    layout_ms = (time.perf_counter() - started) * 1e3 / (n + 1)
    channels_last = context.contiguous(memory_format=torch.channels_last)
    a, b = math.ceil(rows / TILE), math.ceil(w / TILE)
    tile_buffer = torch.empty(n * a * TILE * b * TILE * (TILE + 2 * reach) ** 2)
    native_out = torch.empty(n, rows, w, size, size)
    starts = list(range(reach, h - reach - rows + 1, rows)) or [0]  # chunks whose windows stay on the grid

    kernels = {
        "tile": lambda y0: window_logits_by_tile(
            channels_last, query, y0, y0 + rows, float(reach), "square", TILE, tile_buffer
        ),
        "hand-written": lambda y0: native_logits(module, context_rows, query_packed, y0, y0 + rows, reach, native_out),
    }
    seconds = {name: [] for name in kernels}
    for round_ in range(args.iters + 1):
        for name, kernel in kernels.items():
            y0 = starts[round_ % len(starts)]
            begun = time.perf_counter()
            kernel(y0)
            if round_:  # the first round warms up
                seconds[name].append(time.perf_counter() - begun)

    window = n * rows * w * size * size * channels  # multiply-adds of the chunk's D x D squares
    blocks = math.ceil((TARGETS - 1 + size) / BLOCK)  # per micro-tile and window row
    scored = {
        "tile": n * a * TILE * b * TILE * (TILE + 2 * reach) ** 2 * channels,
        "hand-written": n * rows * math.ceil(w / TARGETS) * TARGETS * blocks * BLOCK * size * channels,
    }
    print(
        f"grid {h} x {w}, {channels} channels, {n} context frames, radius {reach}, {rows} target rows per chunk, "
        f"{args.threads} threads, median of {args.iters}"
    )
    print(f"{'kernel':<14}{'ms/chunk':>10}{'scored/window':>15}{'window GFLOP/s':>16}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<14}{median * 1e3:>10.1f}{scored[name] / window:>15.2f}{2 * window / median / 1e9:>16.1f}")
    ratio = statistics.median(seconds["tile"]) / statistics.median(seconds["hand-written"])
    print(f"hand-written / tile speed: {ratio:.2f}x; its layouts cost {layout_ms:.1f} ms per frame")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
