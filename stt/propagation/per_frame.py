"""Per-frame propagation trials at gather speed: a per-frame candidate store (issue #24).

Per-frame aggregation (stt.propagation, paper 004 Alg. 1 line 36) takes, per target location and context frame,
the top-k of that frame's affinities a inside the window (the whole frame where there is none), weights each by
exp(a / T - log Z), Z the frame's softmax normaliser at the trial's temperature (sum of exp(a / T) over the whole
frame: before-mask; over the window: after-mask), and averages the context frames' soft copies. The overall top-K
graph (stt.propagation.graph) cannot serve it: it holds the best K over all frames, not each frame's top-k, and no
normaliser. This store holds exactly what per-frame trials read, for a whole search space:

    values, locations   per target location (t, j), context slot s and radius r of the space's list: the k_max
                        largest raw affinities inside frame (t - s)'s window of radius r (slot 0: the first frame),
                        best first, -inf where the window has fewer cells; and their flat cells
    log_z_frame         per (t, j, s) and listed temperature T: log sum exp(a / T) over the whole frame
    log_z_window        per (t, j, s, r, T): the same over the window (only when after-mask trials can occur)

A trial is then a gather: for each context frame its stratum's first k values, exp(v / T - log Z) from the stored
normaliser of its T, the labels at the stored cells. Exact by construction (never a fallback): the stratum of the
trial's radius holds that window's top k_max, so its first k are the trial's top-k, in the same order. The ranking
of a / T is the ranking of a for every T > 0, so one store serves every listed temperature; a temperature outside
the list has no stored normaliser, which is why the sweep searches temperature over a list (stt/sweep/space.yaml).
Precision: as the windowed path, fp32; it divides the query by T before the products, the store a after: the
logits differ by a few ulps (float tolerance in the tests).

Memory: (T-1) x N x S x (R x k_max x 6 + n_T x 4 [+ R x n_T x 4]) bytes, S = context + 1 slots, R radii, n_T
temperatures: on the quick plan's synthetic train split at short side 128 (174 target frames of 16 x 29 cells, 21
slots, 6 radii, k_max 20, 10 temperatures) ~1.3 GB; on real DAVIS train at 240 ~10 GB, which `fits` refuses
(the sweep then runs those trials the usual way and says so).

Shapes: T frames, C channels, h x w grid (N = h*w), S slots, R radii, K = k_max, n_T temperatures, L labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from stt.cache import save_atomically
from stt.propagation.rule import check_inputs, inside_window, per_frame_copy, propagate_frames, queue_start

if TYPE_CHECKING:
    from stt.config import PropagationConfig

STORE_VERSION = 1
MAX_BYTES = 4 * 2**30  # per split: above it the sweep runs per-frame trials the usual way


@dataclass(frozen=True)
class PerFrameSpace:
    """What a search space's per-frame trials can ask for: the store is built for exactly this."""

    radii: tuple[float, ...]  # the windows, ascending; 0 = no window (the whole frame)
    temperatures: tuple[float, ...]
    k: int  # the largest top-k
    context: int  # the most context frames
    window: str  # square | circle
    normalize: bool
    after_mask: bool  # whether the window normalisers are needed

    def bytes_per_target(self) -> int:
        slots, radii, temps = self.context + 1, len(self.radii), len(self.temperatures)
        return slots * (radii * self.k * 6 + temps * 4 + (radii * temps * 4 if self.after_mask else 0))


@dataclass
class PerFrameStore:
    """The per-frame candidates of one video (module docstring). Row t - 1 belongs to target frame t."""

    values: torch.Tensor  # (T-1) x N x S x R x K float32
    locations: torch.Tensor  # (T-1) x N x S x R x K int16 | int32
    log_z_frame: torch.Tensor  # (T-1) x N x S x n_T float32
    log_z_window: torch.Tensor | None  # (T-1) x N x S x R x n_T float32
    grid: tuple[int, int]
    space: PerFrameSpace


# ---------------------------------------------------------------- what a store serves


def fits(space: PerFrameSpace, videos: list[tuple[int, tuple[int, int]]]) -> str | None:
    """None when the stores of `videos` ((frames, grid) each) stay under MAX_BYTES, else why not."""
    total = sum((frames - 1) * grid[0] * grid[1] for frames, grid in videos) * space.bytes_per_target()
    if total > MAX_BYTES:
        return f"the per-frame store would take {total / 2**30:.1f} GiB (> {MAX_BYTES / 2**30:.0f} GiB)"
    return None


def serves(store: PerFrameStore, cfg: PropagationConfig) -> str | None:
    """None when `store` gives exactly what stt.propagation.propagate gives under cfg, else the reason."""
    space = store.space
    if cfg.aggregation != "per-frame":
        return f"aggregation={cfg.aggregation!r}: the per-frame store serves per-frame trials"
    if cfg.normalize != space.normalize or cfg.window != space.window:
        return f"normalize={cfg.normalize}, window={cfg.window!r} differ from the store's"
    if cfg.topk > space.k or cfg.context > space.context:
        return f"topk={cfg.topk}, context={cfg.context} exceed the store's {space.k}, {space.context}"
    if cfg.temperature not in space.temperatures:
        return f"temperature={cfg.temperature} is not one of the store's {list(space.temperatures)}"
    if _stratum(space, cfg.radius) is None:
        return f"radius={cfg.radius} is not one of the store's {list(space.radii)}"
    if cfg.radius > 0 and not cfg.window_first_frame and _stratum(space, 0.0) is None:
        return "window_first_frame=False: the store holds no whole-frame stratum"
    if cfg.per_frame_norm == "after-mask" and store.log_z_window is None:
        return "per_frame_norm='after-mask': the store holds no window normalisers"
    checked = {"aggregation", "normalize", "window", "topk", "context", "temperature", "radius"}
    label_only = {"window_first_frame", "per_frame_norm", "soft_labels", "repeat_first_frame", "label_sampling"}
    label_only |= {"minmax_normalise", "chunk_size"}
    for field in dataclasses.fields(cfg):
        if field.name not in checked | label_only:
            return f"{field.name}: stt.propagation.per_frame does not know what it changes"
    return None


def _stratum(space: PerFrameSpace, radius: float | None) -> int | None:
    """The stratum holding the window of `radius` (integer offsets: a square of radius r is that of floor(r))."""
    if radius is None:
        return None
    for index, r in enumerate(space.radii):
        if r == radius or (space.window == "square" and r > 0 and radius > 0 and math.floor(r) == math.floor(radius)):
            return index
    return None


# ---------------------------------------------------------------- building


def build_store(features: torch.Tensor, space: PerFrameSpace, chunk_size: int = 256) -> PerFrameStore:
    """The per-frame store of a video (features T x C x h x w, float32 or float64, as propagate takes them).

    Per chunk of target locations and per slot: the affinities with the whole context frame (one matrix product)
    and their log-sum-exp at each listed temperature. The windows are nested (radius 0, the whole frame, is the
    widest), so each radius's top k_max is taken from the previous radius's and the cells its ring adds
    (`window_rings`): the top-k runs over about the widest window's cells once, not over every window (the
    quick plan's 6 stores: 31.6 -> 16.8 CPU s, the same values; BENCHMARKS.md). Whole-frame products: this is
    for grids where a wide window is most of the frame (the quick plan's); `fits` bounds the memory.
    """
    if features.dim() != 4 or features.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"features: expected a float T x C x h x w tensor, got {features.dtype} {tuple(features.shape)}"
        )
    num_frames, _, h, w = features.shape
    num, slots = h * w, space.context + 1
    used = F.normalize(features, dim=1) if space.normalize else features
    flat = used.flatten(2)  # T x C x N
    rows, radii, temps = max(num_frames - 1, 0), len(space.radii), len(space.temperatures)
    k = min(space.k, num)
    values = features.new_full((rows, num, slots, radii, space.k), float("-inf"))
    locations = torch.zeros(values.shape, dtype=torch.int16 if num < 2**15 else torch.int32)
    log_z_frame = features.new_full((rows, num, slots, temps), float("-inf"))
    log_z_window = features.new_full((rows, num, slots, radii, temps), float("-inf")) if space.after_mask else None
    chunks = [slice(start, min(start + chunk_size, num)) for start in range(0, num, chunk_size)]
    rings = {chunk.start: window_rings((h, w), chunk, space.radii, space.window) for chunk in chunks}
    for t in range(1, num_frames):
        frames = [0, *[t - s for s in range(1, slots) if t - s >= 1]]  # slot s: frame t - s (slot 0: frame 0)
        context = flat[frames]  # S' x C x N
        for targets in chunks:
            logits = torch.einsum("cb,scn->bsn", flat[t, :, targets], context)  # B x S' x N, raw affinities
            # log sum exp(a / T) = m / T + log sum exp((a - m) / T), m the row's maximum, shared by every T
            peak = logits.amax(dim=-1, keepdim=True)
            below = logits - peak
            for i, temperature in enumerate(space.temperatures):
                log_z = peak[..., 0] / temperature + (below / temperature).exp().sum(dim=-1).log()
                log_z_frame[t - 1, targets, : len(frames), i] = log_z
            # each radius from the narrowest window out: the previous top-k and the ring's cells
            top = logits.new_full((*logits.shape[:2], k), float("-inf"))  # B x S' x k
            cell = torch.zeros(top.shape, dtype=torch.long)
            window_z = logits.new_full((*logits.shape[:2], temps), float("-inf"))  # B x S' x n_T
            for r, ring in rings[targets.start]:
                if ring is not None:
                    index, valid = ring  # B x M
                    index = index[:, None, :].expand(-1, len(frames), -1)  # B x S' x M
                    added = logits.gather(-1, index).masked_fill_(~valid[:, None, :], float("-inf"))
                    top, pick = torch.cat([top, added], dim=-1).topk(k, dim=-1)
                    cell = torch.cat([cell, index], dim=-1).gather(-1, pick)
                    if log_z_window is not None:
                        added_z = torch.stack([(added / T).logsumexp(dim=-1) for T in space.temperatures], dim=-1)
                        window_z = torch.logaddexp(window_z, added_z)
                values[t - 1, targets, : len(frames), r, :k] = top
                locations[t - 1, targets, : len(frames), r, :k] = cell.to(locations.dtype)
                if log_z_window is not None:
                    log_z_window[t - 1, targets, : len(frames), r] = window_z
    return PerFrameStore(values, locations, log_z_frame, log_z_window, (h, w), space)


def window_rings(
    grid: tuple[int, int], targets: slice, radii: tuple[float, ...], window: str
) -> list[tuple[int, tuple[torch.Tensor, torch.Tensor] | None]]:
    """(radius index, ring) for each of `radii`, narrowest window first (0, the whole frame, last), where the ring
    is what that window adds to the previous one for the target locations `targets` (B of them): its cells
    (B x M, each row's in flat order, padded to the widest row's M) and whether each is one (B x M bool); None
    where no target's window grows."""
    h, w = grid
    cells = torch.arange(h * w)
    ys, xs = cells // w, cells % w
    dy, dx = ys[None, :] - ys[targets, None], xs[None, :] - xs[targets, None]  # B x N
    covered = torch.zeros(dy.shape, dtype=torch.bool)
    rings = []
    for r in sorted(range(len(radii)), key=lambda r: math.inf if radii[r] == 0 else radii[r]):
        inside = inside_window(dy, dx, radii[r], window) if radii[r] > 0 else torch.ones_like(covered)
        ring = inside & ~covered
        width = int(ring.sum(dim=1).max())
        if width == 0:
            rings.append((r, None))
            continue
        index = torch.argsort((~ring).to(torch.uint8), dim=1, stable=True)[:, :width]  # the ring's cells first
        rings.append((r, (index, ring.gather(1, index))))
        covered = inside
    return rings


# ---------------------------------------------------------------- one trial


def propagate_per_frame(store: PerFrameStore, first_labels: torch.Tensor, cfg: PropagationConfig) -> torch.Tensor:
    """What stt.propagation.propagate(features, first_labels, cfg) returns for a per-frame cfg the store serves:
    T x L x h x w soft labels (frame 0 = first_labels). ValueError with `serves`'s reason otherwise."""
    reason = serves(store, cfg)
    if reason is not None:
        raise ValueError(f"this per-frame store cannot serve the setting: {reason}")
    h, w = store.grid
    num, num_labels = h * w, first_labels.shape[0]
    num_frames = store.values.shape[0] + 1
    check_inputs(torch.empty(num_frames, 1, h, w, dtype=store.values.dtype), first_labels.to(store.values.dtype), cfg)
    space = store.space
    stratum, whole = _stratum(space, cfg.radius), _stratum(space, 0.0)
    first_stratum = stratum if cfg.radius == 0 or cfg.window_first_frame else whole
    temp = space.temperatures.index(cfg.temperature)

    def predict(t: int, carried: torch.Tensor) -> torch.Tensor:  # carried: T x N x L
        # the context entries of stt.propagation.context_indices as runs of slots, each read as a view (no
        # gather): the first frame (its window iff window_first_frame), the first frame again where the queue
        # repeats it, and the queue's frames t - 1 .. max(1, t - n), slots 1 .. m
        queue = range(queue_start(t, cfg.context, cfg.repeat_first_frame), t)
        latest = sum(1 for f in queue if f > 0)
        runs = [(0, 1, first_stratum), *[(0, 1, stratum) for f in queue if f == 0], (1, latest + 1, stratum)]
        log_probs, rows = [], []
        for first_slot, end_slot, r in runs:
            top = store.values[t - 1, :, first_slot:end_slot, r, : cfg.topk]  # N x n' x k
            if cfg.per_frame_norm == "after-mask":
                log_z = store.log_z_window[t - 1, :, first_slot:end_slot, r, temp]  # N x n'
            else:
                log_z = store.log_z_frame[t - 1, :, first_slot:end_slot, temp]
            log_probs.append(top / cfg.temperature - log_z[..., None])  # -inf (no such cell) -> weight 0
            frame = t - torch.arange(first_slot, end_slot) if first_slot else torch.zeros(1, dtype=torch.long)
            cell = store.locations[t - 1, :, first_slot:end_slot, r, : cfg.topk]
            rows.append(cell + (frame * num)[None, :, None])  # N x n' x k: rows of the flat T*N labels
        entries = len(runs) - 1 + latest
        return per_frame_copy(torch.cat(log_probs, 1), torch.cat(rows, 1), carried.flatten(0, 1), entries, True)

    first = first_labels.to(dtype=store.values.dtype, device=store.values.device).flatten(1).T  # N x L
    predicted = propagate_frames(first, num_frames, predict, cfg.soft_labels, label_dim=1)  # T x N x L
    return predicted.transpose(1, 2).reshape(num_frames, num_labels, h, w).contiguous()


# ---------------------------------------------------------------- on disk, beside the feature cache


def store_path(feature_file: Path, space: PerFrameSpace) -> Path:
    """Beside the features cached at `feature_file`, keyed by the space it serves and the format."""
    key = hashlib.sha256(json.dumps([STORE_VERSION, dataclasses.asdict(space)]).encode()).hexdigest()[:16]
    feature_file = Path(feature_file)
    return feature_file.with_name(f"{feature_file.stem}.per-frame-{key}.pt")


def save_store(store: PerFrameStore, path: Path) -> None:
    """The store's tensors, grid and space via torch.save (the features are in the feature cache)."""
    state = {f.name: getattr(store, f.name) for f in dataclasses.fields(store) if f.name not in ("grid", "space")}
    save_atomically(
        {"version": STORE_VERSION, **state, "grid": list(store.grid), "space": dataclasses.asdict(store.space)}, path
    )


def load_store(path: Path) -> PerFrameStore:
    """A saved store, memory-mapped (torch.load mmap=True): the sweep's trial actors share its pages."""
    state = torch.load(path, weights_only=True, mmap=True)
    if state.get("version") != STORE_VERSION:
        raise ValueError(f"{path}: per-frame store format {state.get('version')}, expected {STORE_VERSION}")
    space = state["space"]
    space = PerFrameSpace(**{**space, "radii": tuple(space["radii"]), "temperatures": tuple(space["temperatures"])})
    return PerFrameStore(
        state["values"],
        state["locations"],
        state["log_z_frame"],
        state["log_z_window"],
        tuple(state["grid"]),
        space,
    )
