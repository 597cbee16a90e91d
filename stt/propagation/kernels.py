"""The windowed kernels: the logits of a chunk of target rows against the context cells near each target,
without ever building an N x (n*N) affinity. Three ways, `choose_window_kernel` picks the cheapest:

    shift   C multiply-adds over shifted views of the context (few channels), the D x D square of
            offsets around each target (D = 2R + 1, R = floor(radius));
    tile    one matmul per context frame and t x t tile of targets against the tile's (t + 2R)^2 patch;
    band    one matmul per context frame against the band of whole grid rows the chunk's windows reach
            (a wide radius at a small input, where the square is wider than the grid).

A kernel scores a chunk of target rows y0 <= y < y1 against M context cells per target and windowed
context frame: logits n x (target dims) x M; a bias (target dims) x M, -inf where the context cell is off
the grid or outside the window, else 0 (the same for every frame, so it is added to the few values that
need it); and each cell's flat location in its frame, (target dims) x M. The target dims flatten,
row-major, to a grid of at least r x w targets (r = y1 - y0) whose top-left r x w block is the chunk
(`chunk_targets`). Shapes: n context frames, C channels, h x w grid, R = floor(radius).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stt.propagation.rule import inside_window

# Up to this many feature channels the window logits are computed as shifted multiply-adds,
# above it as tile matmuls (measured on a 2-core CPU at 60x107: shift 1.4x faster at C = 3,
# even at C = 4, tile faster from C = 8 on).
SHIFT_MAX_CHANNELS = 4
# Logits per chunk of the windowed implementation (n * M per target), at most: small enough to
# stay in cache (measured fastest from 2**20 to 2**21 on the CPU); the tile matmuls take whole tile rows.
CHUNK_LOGITS = 2**21


def rows_reached(y0: int, y1: int, reach: int, h: int) -> tuple[int, int]:
    """The grid rows [top, bottom) that the windows of target rows y0 <= y < y1 reach (R = reach), on the grid."""
    return max(y0 - reach, 0), min(y1 + reach, h)


def window_bias(
    target_y: torch.Tensor,
    target_x: torch.Tensor,
    context_y: torch.Tensor,
    context_x: torch.Tensor,
    grid: tuple[int, int],
    radius: float,
    window: str,
) -> torch.Tensor:
    """0 where context cell (context_y, context_x) lies on the h x w grid and in the window of
    target (target_y, target_x), else -inf (broadcast shape of the four integer tensors).
    Added to the products, it excludes those cells before the top-k."""
    h, w = grid
    on_grid = (context_y >= 0) & (context_y < h) & (context_x >= 0) & (context_x < w)
    allowed = on_grid & inside_window(context_y - target_y, context_x - target_x, radius, window)
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def buffer_view(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A `shape` tensor in the memory of `out` (flat, large enough) when given, else a new one.

    The windowed implementation reuses one buffer for every chunk's logits: on the CPU a fresh
    allocation of tens of MiB comes from mmap and costs a page fault per 4 KiB at first touch."""
    if out is None:
        return like.new_empty(shape)
    return out[: math.prod(shape)].view(shape)


def flat_location(context_y: torch.Tensor, context_x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """y * w + x, clamped onto the grid: an off-grid cell has logit -inf (weight 0) but must still index."""
    h, w = grid
    return context_y.clamp(0, h - 1) * w + context_x.clamp(0, w - 1)


def context_band(context: torch.Tensor, y0: int, y1: int, reach: int, width: int) -> torch.Tensor:
    """Rows [y0 - R, y1 + R) and columns [-R, width + R) of the context frames (... x C x h x w), zero where
    off the h x w grid: ... x C x (y1 - y0 + 2R) x (width + 2R)."""
    h, w = context.shape[-2:]
    top, bottom = rows_reached(y0, y1, reach, h)
    above, below = top - (y0 - reach), (y1 + reach) - bottom  # rows of the band off the grid
    return F.pad(context[..., top:bottom, :], (reach, reach + width - w, above, below))


def window_logits_by_shift(
    context: torch.Tensor,
    query: torch.Tensor,
    y0: int,
    y1: int,
    radius: float,
    window: str,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window logits as C multiply-adds over shifted views (few channels: far fewer operations than a matmul).

    context: n x C x h x w; query: C x h x w (target features / temperature). The M = D*D cells
    of target (y, x) are (y + dy, x + dx), |dy|, |dx| <= R = floor(radius). Returns logits
    n x r x w x D*D, [f, y - y0, x, (R + dy) * D + R + dx] = query[:, y, x] . context[f, :, y + dy, x + dx]
    (in `out`'s memory if given, `buffer_view`), bias and locations r x w x D*D.
    """
    n, channels, h, w = context.shape
    rows, reach = y1 - y0, math.floor(radius)
    size = 2 * reach + 1
    offsets = torch.arange(-reach, reach + 1, device=context.device)
    target_y = torch.arange(y0, y1, device=context.device)[:, None]  # r x 1
    target_x = torch.arange(w, device=context.device)  # w
    context_y, context_x = (
        offsets[:, None, None, None] + target_y,
        offsets[:, None, None] + target_x,
    )  # D x 1 x r x 1, D x 1 x w
    bias = window_bias(target_y, target_x, context_y, context_x, (h, w), radius, window).permute(2, 3, 0, 1).flatten(2)
    locations = flat_location(context_y, context_x, (h, w)).permute(2, 3, 0, 1).reshape(rows, w, size * size)

    band = context_band(context, y0, y1, reach, w)  # n x C x (r + 2R) x (w + 2R)
    shifted = band.unfold(2, size, 1).unfold(
        3, size, 1
    )  # n x C x r x w x D x D: [.., y, x, i, j] = band[.., y + i, x + j]
    target = query[:, y0:y1, :, None, None]  # C x r x w x 1 x 1
    logits = buffer_view(out, (n, size, size, rows, w), context).permute(0, 3, 4, 1, 2)  # n x r x w x D x D
    torch.mul(shifted[:, 0], target[0], out=logits)
    for c in range(1, channels):
        logits.addcmul_(shifted[:, c], target[c])
    return logits.flatten(3), bias, locations


def window_logits_by_tile(
    context: torch.Tensor,
    query: torch.Tensor,
    y0: int,
    y1: int,
    radius: float,
    window: str,
    tile: int,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window logits as one batched matmul per context frame and row of t x t target tiles (many channels).

    Each tile's targets are multiplied with the tile's whole (t + 2R)^2 context patch, the M
    cells of each of its targets (those outside a target's window get bias -inf). A patch's cells are
    ordered column by column (x-major): a row of tiles reads its context from one band of t + 2R grid
    rows laid out column by column with the channels innermost, where every tile's patch is a plain
    (t + 2R)^2 x C block and the next tile's starts t columns on. So the batched matmul reads the
    patches in place: copying them out, each context cell (1 + 2R / t)^2 times, took as long as the
    products (a third of a 480p evaluation). The logits are the same bits either way (each is one dot
    product over the channels). Arguments as `window_logits_by_shift`; `context` in any memory layout
    (channels-last frames copy fastest). Returns logits n x a x t x b x t x M (a x b tiles over r x w),
    bias and locations a x t x b x t x M.
    """
    n, channels, h, w = context.shape
    rows, reach = y1 - y0, math.floor(radius)
    patch = tile + 2 * reach
    a, b = math.ceil(rows / tile), math.ceil(w / tile)  # tiles down and across
    in_tile, in_patch = torch.arange(tile, device=context.device), torch.arange(patch, device=context.device)
    tile_y = y0 + tile * torch.arange(a, device=context.device)  # a: first row of each tile
    tile_x = tile * torch.arange(b, device=context.device)  # b
    # dims a x b x t (target row) x t (target column) x patch (column) x patch (row): x-major cells
    context_y = (tile_y[:, None] + in_patch - reach)[:, None, None, None, None, :]  # a x 1 x 1 x 1 x 1 x patch
    context_x = (tile_x[:, None] + in_patch - reach)[:, None, None, :, None]  # b x 1 x 1 x patch x 1
    target_y = (tile_y[:, None] + in_tile)[:, None, :, None, None, None]  # a x 1 x t x 1 x 1 x 1
    target_x = (tile_x[:, None] + in_tile)[:, None, :, None, None]  # b x 1 x t x 1 x 1
    bias = window_bias(
        target_y, target_x, context_y, context_x, (h, w), radius, window
    )  # a x b x t x t x patch x patch
    locations = flat_location(context_y, context_x, (h, w)).reshape(a, 1, b, 1, patch * patch)

    target = F.pad(query[:, y0:y1], (0, b * tile - w, 0, a * tile - rows))  # C x a*t x b*t
    tiles = target.reshape(channels, a, tile, b, tile).permute(1, 3, 2, 4, 0).reshape(a, b, tile * tile, channels)
    logits = buffer_view(out, (n, a, b, tile, tile, patch * patch), context)
    # Per row of tiles, its band of grid rows: columns -R .. b*t + R, zero off the grid, refilled frame after frame
    # (fresh memory would cost page faults).
    bands = context.new_zeros(a, b * tile + 2 * reach, patch, channels)
    for f in range(n):
        for i in range(a):
            top, bottom = rows_reached(y0 + i * tile, y0 + (i + 1) * tile, reach, h)
            above = top - (y0 + i * tile - reach)
            bands[i, reach : reach + w, above : above + bottom - top].copy_(context[f, :, top:bottom].permute(2, 1, 0))
            patches = bands[i].as_strided((b, patch * patch, channels), (tile * patch * channels, channels, 1))
            torch.bmm(tiles[i], patches.transpose(1, 2), out=logits[f, i].view(b, tile * tile, -1))
    bias = bias.reshape(a, b, tile, tile, patch * patch).permute(0, 2, 1, 3, 4)
    return logits.permute(0, 1, 3, 2, 4, 5), bias, locations.expand(a, tile, b, tile, -1)


def window_logits_by_band(
    context: torch.Tensor,
    query: torch.Tensor,
    y0: int,
    y1: int,
    radius: float,
    window: str,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window logits as one matmul per context frame against the band of whole grid rows the chunk's
    windows reach (wide windows on small grids: fewer cells per target than a D x D square).

    Every target of rows y0 <= y < y1 is scored against all M = b*w cells of rows
    max(0, y0 - R) <= y' < min(h, y1 + R) (b rows, R = floor(radius)); those outside its window get
    bias -inf. Arguments as `window_logits_by_shift`; returns logits n x B x M (B = r*w targets),
    bias B x M and locations B x M (flat cells of the frame; a view of one row).
    """
    n, channels, h, w = context.shape
    reach = math.floor(radius)
    top, bottom = rows_reached(y0, y1, reach, h)
    targets = query[:, y0:y1].flatten(1)  # C x B
    logits = buffer_view(out, (n, targets.shape[1], (bottom - top) * w), context)
    torch.matmul(targets.T, context[:, :, top:bottom].flatten(2), out=logits)  # n x B x M
    cells = torch.arange(top * w, bottom * w, device=context.device)  # M
    target_y = torch.arange(y0, y1, device=context.device)[:, None, None]  # r x 1 x 1
    target_x = torch.arange(w, device=context.device)[:, None]  # w x 1
    bias = window_bias(target_y, target_x, cells // w, cells % w, (h, w), radius, window).flatten(0, 1)  # B x M
    return logits, bias, cells.expand(bias.shape)


@dataclass(frozen=True)
class WindowKernel:
    """How `predict_windowed` (and the graph builder) score a windowed chunk: `name` (shift, tile or band),
    target rows per chunk, the width its targets are laid out at (tile: padded to whole tiles), logits per
    target and frame at most (the buffer's size) and the tile side (tile only)."""

    name: str
    rows_per_chunk: int
    scored_width: int
    cells_per_target: int
    tile: int

    def buffer(self, frames: int, like: torch.Tensor) -> torch.Tensor:
        """One flat buffer for every chunk's logits of `frames` context frames."""
        return like.new_empty(frames * self.rows_per_chunk * self.scored_width * self.cells_per_target)

    def logits(
        self,
        context: torch.Tensor,
        query: torch.Tensor,
        y0: int,
        y1: int,
        radius: float,
        window: str,
        out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """This kernel's logits, bias and locations for target rows y0 <= y < y1 (as `window_logits_by_shift`),
        and the grid their target dims flatten to (`chunk_targets`'s `scored`)."""
        if self.name == "band":
            logits, bias, locations = window_logits_by_band(context, query, y0, y1, radius, window, out)
        elif self.name == "shift":
            logits, bias, locations = window_logits_by_shift(context, query, y0, y1, radius, window, out)
        else:
            logits, bias, locations = window_logits_by_tile(context, query, y0, y1, radius, window, self.tile, out)
        rows = math.ceil((y1 - y0) / self.tile) * self.tile if self.name == "tile" else y1 - y0
        return logits, bias, locations, (rows, self.scored_width)


def choose_window_kernel(
    grid: tuple[int, int], frames: int, channels: int, radius: float, chunk_size: int, tile: int, kernel: str = "auto"
) -> WindowKernel:
    """The kernel that scores the fewest cells per target (kernel="auto"), or the one named.

    shift / tile score a D x D square ((t + 2R)^2 for t x t tiles) around every target, wasted where it
    leaves the grid; band scores whole rows, min(h, r + 2R) of them. On DAVIS at short side 128 (16 x 29
    cells, 256 channels) a band is the whole frame, 464 cells per target: tiles win at R = 6 (400), the
    band from R = 9 (676 as tiles) to R = 35 (6,084); at 480p (60 x 107) radius 12 is 1,024 cells as
    tiles against >= 2,675 as a band.
    Chunks hold at most chunk_size targets and CHUNK_LOGITS logits (frames x targets x cells).
    """
    h, w = grid
    reach = math.floor(radius)

    def rows_fitting(cells_for_rows) -> int:  # the most rows a chunk may hold (at least one)
        fits = [
            r for r in range(1, h + 1) if r * w <= chunk_size and frames * r * w * cells_for_rows(r) <= CHUNK_LOGITS
        ]
        return max(fits, default=1)

    band_rows = rows_fitting(lambda r: min(h, r + 2 * reach) * w)
    band = WindowKernel("band", band_rows, w, min(h, band_rows + 2 * reach) * w, tile)
    if channels <= SHIFT_MAX_CHANNELS:
        span = 2 * reach + 1
        square = WindowKernel("shift", rows_fitting(lambda r: span**2), w, span**2, tile)
    else:
        span = tile + 2 * reach
        rows = tile * max(1, rows_fitting(lambda r: span**2) // tile)
        square = WindowKernel("tile", rows, math.ceil(w / tile) * tile, span**2, tile)
    if kernel == "auto":
        return band if band.cells_per_target < square.cells_per_target else square
    if kernel == "band":
        return band
    if kernel == "square":
        return square
    raise ValueError(f"kernel: expected one of ('auto', 'band', 'square'), got {kernel!r}")


def chunk_targets(x: torch.Tensor, scored: tuple[int, int], rows: int, w: int) -> torch.Tensor:
    """(target dims) x m, the target dims flattening to a `scored` grid, -> the chunk's rows*w x m."""
    return x.reshape(*scored, x.shape[-1])[:rows, :w].reshape(rows * w, -1)
