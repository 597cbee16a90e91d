"""An exact top-K affinity graph: propagation trials at gather speed (issue #12).

A propagation trial (stt.propagation.propagate, "overall" aggregation) spends nearly all its time
on affinities: for every target location, the dot products with every allowed location of its
context frames, then a top-k. Those affinities depend on the features only, never on the labels;
only the label copy does (and the recurrence: frame t's predictions are later frames' context
labels). So for a whole search space we compute them once:

    build_graph     per target location (t, j), the K best candidates (context frame f, location i,
                    raw affinity a = <feature_t[j], feature_f[i]>) over the WIDEST setting of the
                    space (the superset: most context frames, largest radius, square window, first
                    frame unwindowed if any trial leaves it so). Sorted, best first.
    propagate_with_graph
                    one trial: keep the candidates the trial allows (its context frames, radius,
                    window shape, first-frame rule), the repeated first frame counted twice, take
                    the top-k of a / T, softmax, copy labels. Same recurrence as stt.propagation.

Why this is exact. Let U be the superset's candidates of a target, S the K cached ones (every
candidate outside S scores no higher than the K-th cached one), A the trial's candidates (A is in U:
`serves` refuses any trial that could reach outside it). If at least k candidates of S survive the
trial's filter, each candidate of A outside S scores no higher than all of them, so the trial's
top-k lies in S. If fewer survive, that target location is computed the usual way against all its
context (`_exact_rows`: `predict_dense`'s top-k over the band of grid rows its window reaches),
and counted as a fallback. A location whose superset has at most K candidates at all (tiny grids,
early frames) is held whole: never a fallback.

A lattice of graphs (issue 25). One superset serves every trial, but at 480p the top-64 of a radius-35 window
over 20 frames mostly lies outside a radius-6 trial's window: 9-70 % of target locations fell back. The sweep
therefore builds one graph per (context, radius) pair of its space (stt.sweep.space.graph_lattice), K the
largest top-k searched, and `pick_graph` gives a trial the first graph that serves it, narrowest first: the one
built for exactly its context and radius, whose candidates are the trial's own (A = U above): every cached one
survives the trial's filter, K >= k of them (or all there are), and nothing falls back. A trial off the
lattice meets the next wider graph and the fallback rule. Cost: (contexts x radii) graphs of K entries each,
built in one pass (`build_graphs`: the widest products once, each point's top-k from them; BENCHMARKS.md,
"A lattice of graphs at 480p" and "built in one pass").

Settings the graph cannot serve exactly: per-frame aggregation (its softmax normaliser sums exp(a / T)
over every cell of a frame or of its window at the trial's temperature: it needs every affinity, and a
per-frame top-K would give the top-k but not that sum), another `normalize`, other features. `serves`
names the reason and the caller runs stt.propagation (on small grids as a band of whole rows: the same
matrix products as dense, `choose_window_kernel`).

Precision. Affinities are kept in fp32, the dtype of the existing path's logits (fp64 features give
fp64). The trial divides them by T; the windowed implementation divides the query by T before the
products, the dense one after: the three differ by a few fp32 ulps per logit and rank candidates
the same except where affinities lie within those ulps of each other at the top-k boundary. There
any choice is as right as another, and dense and windowed already disagree with each other as much
as the graph does (bench/propagation_graph.py --dense; random-init features, whose affinities crowd
near 1, reach soft-label differences of 1e-2 that way, with identical masks). In fp64 the tests
find the graph, dense and windowed equal to 1e-10 on real DAVIS. fp16 storage would be 2**-11
relative: at T = 0.01 a logit error of ~0.05, a 5 % change of a softmax weight, so it is not used.
Frames are int16 (T < 32768), locations int16 when the grid has under 32768 cells (60 x 107 DAVIS at
stride 8, 120 x 214 at stride 4), else int32. Memory: (T-1) x N x K x (4 + 2 + 2) bytes; a 70-frame
480p sequence at stride 8 with K = 64 (default_k for top-k up to 32) is ~230 MB, at short side 240 ~55 MB.

Shapes: T frames, C channels, h x w grid (N = h*w cells), L labels, K cached candidates per target,
k the trial's top-k. Row t - 1 of the graph's tensors belongs to target frame t (frame 0 is given).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stt.cache import save_atomically
from stt.config import PropagationConfig

# The graph is built with the very kernels a trial of stt.propagation runs (stt.propagation.kernels), and its
# trials select and weigh by the same rule (stt.propagation.rule), so its numbers are those of the existing path.
from stt.propagation.kernels import CHUNK_LOGITS, choose_window_kernel, chunk_targets, rows_reached
from stt.propagation.rule import (
    check_inputs,
    context_indices,
    first_windowed_frame,
    inside_window,
    overall_weights,
    propagate_frames,
    queue_start,
    soft_copy,
    top_overall,
)

GRAPH_VERSION = 1  # part of the file key: a change of the format or of its meaning makes new files
# K of the sweep's graphs: at least twice the largest top-k searched, at least 64. bench/propagation_graph.py
# (random-init R18 on real DAVIS at short side 240, stt/sweep/space.yaml): K 40 left 3-22 % of target locations
# to the fallback depending on the trial, K 64 0.4-6 %, for the same build time and 1.6x the memory.
MIN_K = 64

# How each PropagationConfig field meets a graph. A field missing from all three (one added later) is
# served only when it equals the superset's value: unknown means it may change the affinities.
LABEL_ONLY = (
    "temperature",
    "soft_labels",
    "repeat_first_frame",
    "label_sampling",
    "minmax_normalise",
    "chunk_size",
    "per_frame_norm",
)  # per_frame_norm: unused by "overall" aggregation
BOUNDED = ("topk", "context", "radius", "window", "window_first_frame")  # a trial may use less than the superset
AFFINITY = ("aggregation", "normalize")  # must equal the superset's (aggregation: "overall")


def default_k(superset: PropagationConfig) -> int:
    """K for a superset whose largest searched top-k is superset.topk."""
    return max(MIN_K, 2 * superset.topk)


@dataclass
class Graph:
    """The top-K candidates of every target location of one video, for one superset setting.

    value: (T-1) x N x K float32, raw affinities (dot products of the features, L2-normalised iff
    superset.normalize), best first; -inf pads a target with fewer than K candidates.
    frame: (T-1) x N x K int16, the candidate's context frame (always < its target frame).
    location: (T-1) x N x K int16 | int32, its flat cell y * w + x in that frame.
    features: T x C x h x w, the features as given to `build_graph` (only the fallbacks use them;
    not saved: `load_graph` takes them from the feature cache again).
    """

    value: torch.Tensor
    frame: torch.Tensor
    location: torch.Tensor
    grid: tuple[int, int]
    superset: PropagationConfig
    features: torch.Tensor

    @property
    def k(self) -> int:
        return self.value.shape[-1]


# ---------------------------------------------------------------- what a graph serves


def serves(graph: Graph, cfg: PropagationConfig) -> str | None:
    """None when `graph` gives exactly what stt.propagation.propagate(graph.features, ..., cfg) gives,
    else the reason it cannot (the caller then runs the existing path)."""
    sup = graph.superset
    if cfg.aggregation != "overall":
        return (
            f"aggregation={cfg.aggregation!r}: a per-frame softmax sums over every cell of a frame (or of its window) "
            "at the trial's temperature, which a top-K graph does not hold"
        )
    if cfg.normalize != sup.normalize:
        return f"normalize={cfg.normalize}: the graph's affinities are of normalize={sup.normalize} features"
    if cfg.topk > graph.k:
        return f"topk={cfg.topk} exceeds the graph's K={graph.k}"
    if cfg.context > sup.context:
        return f"context={cfg.context} exceeds the graph's {sup.context} frames"
    if cfg.radius is None:
        return "radius=None: resolve it with stt.propagation.for_task first"
    if sup.radius > 0:  # a windowed superset: the trial's windows must lie inside it
        if cfg.radius == 0:
            return f"radius=0 (no window) is wider than the graph's radius {sup.radius}"
        if sup.window == "square" and math.floor(cfg.radius) > math.floor(sup.radius):
            # integer offsets: |d| <= r iff |d| <= floor(r), and a circle lies inside the square of its radius
            return f"radius={cfg.radius} exceeds the graph's {sup.radius}"
        if sup.window == "circle" and (cfg.window != "circle" or cfg.radius > sup.radius):
            return f"window={cfg.window!r} radius={cfg.radius} is not inside the graph's circle of radius {sup.radius}"
        if sup.window_first_frame and not cfg.window_first_frame:
            return "window_first_frame=False: the graph holds only the first frame's window"
    known = set(LABEL_ONLY) | set(BOUNDED) | set(AFFINITY)
    for field in dataclasses.fields(cfg):
        if field.name not in known and getattr(cfg, field.name) != getattr(sup, field.name):
            return (
                f"{field.name}={getattr(cfg, field.name)!r} differs from the graph's "
                "and stt.propagation.graph does not know what it changes"
            )
    return None


def pick_graph(graphs: list[Graph], cfg: PropagationConfig) -> tuple[Graph | None, str | None]:
    """The first of `graphs` that serves cfg, or None and the last one's reason.

    graphs: one video's graphs, narrowest superset first (stt.sweep.space.graph_lattice's order: context,
    then radius): the first that serves a trial is the one built for its context and radius when there is one,
    whose candidates are exactly the trial's, so none of its target locations falls back."""
    reason = "no graphs"
    for graph in graphs:
        reason = serves(graph, cfg)
        if reason is None:
            return graph, None
    return None, reason


# ---------------------------------------------------------------- building


def build_graph(features: torch.Tensor, superset: PropagationConfig, k: int, tile: int = 8) -> Graph:
    """The top-k candidates of every target location of a video under `superset` (see the module docstring).

    features: T x C x h x w float32 (CPU or CUDA), as stt.propagation.propagate takes them. superset:
    an "overall" PropagationConfig with radius resolved (stt.sweep.space.superset_config); its topk and temperature
    play no part (candidates are ranked by raw affinity: the ranking of a / T for every T > 0).
    Memory stays bounded as in stt.propagation.predict_windowed: target rows in chunks of at most
    superset.chunk_size locations and CHUNK_LOGITS logits.
    """
    return build_graphs(features, [superset], k, tile)[0]


def build_graphs(features: torch.Tensor, supersets: list[PropagationConfig], k: int, tile: int = 8) -> list[Graph]:
    """`build_graph` for each of `supersets` at once: a lattice (stt.sweep.space.graph_lattice) of contexts and radii
    sharing one window shape, first-frame rule and normalisation.

    One pass: each chunk of target rows is scored once, against the widest context and window of the lattice (the
    kernel stt.propagation.predict_windowed would choose for it), and each superset takes its top-k from those
    logits: its frames (their maximum over frames is shared by every radius of a context) and its window's cells
    (the widest window's bias, -inf also outside its own radius). The candidates are each superset's own, as a
    build per superset would find them; the products are made once instead of once per lattice point (18 on the
    default space: on the quick plan's 128-pixel grids the lattice took 24x the products of one graph).
    """
    if features.dim() != 4 or features.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"features: expected a float32 (or float64) T x C x h x w tensor, "
            f"got {features.dtype} of shape {tuple(features.shape)}"
        )
    num_frames, channels, h, w = features.shape
    if k < 1 or num_frames >= 2**15:
        raise ValueError(f"expected k >= 1 and fewer than 32768 frames, got k={k}, {num_frames} frames")
    for superset in supersets:
        if superset.aggregation != "overall":
            raise ValueError(f"superset.aggregation: a graph holds the 'overall' top-K, got {superset.aggregation!r}")
        if superset.radius is None or superset.radius < 0:
            raise ValueError(f"superset.radius: expected a resolved radius >= 0, got {superset.radius!r}")
    shared = {(s.window, s.window_first_frame, s.normalize) for s in supersets}
    if len(shared) != 1 or (len(supersets) > 1 and min(s.radius for s in supersets) == 0):
        raise ValueError(
            "supersets: a lattice shares one window, window_first_frame and normalize, every radius > 0; "
            f"got {sorted(shared)} and radii {[s.radius for s in supersets]}"
        )
    widest = dataclasses.replace(
        supersets[0], context=max(s.context for s in supersets), radius=max(s.radius for s in supersets)
    )
    used = F.normalize(features, dim=1) if widest.normalize else features  # exactly as propagate_video
    used = used.contiguous(memory_format=torch.channels_last)  # as propagate_windowed: the tile kernel's bands
    num = h * w
    rows = max(num_frames - 1, 0)
    graphs = [
        Graph(
            features.new_full((rows, num, k), float("-inf")),
            torch.zeros((rows, num, k), dtype=torch.int16, device=features.device),
            torch.zeros((rows, num, k), dtype=torch.int16 if num < 2**15 else torch.int32, device=features.device),
            (h, w),
            superset,
            features,
        )
        for superset in supersets
    ]
    most = widest.context + 1  # context frames per target at most
    plan = choose_window_kernel((h, w), most, channels, widest.radius, widest.chunk_size, tile)
    buffer = plan.buffer(most, used)
    biases, rings = {}, {}  # per chunk and radii: the windows' geometry, the same for every target frame
    for t in range(1, num_frames):
        frames = context_indices(t, widest.context)  # [0, max(1, t - context) .. t - 1]: each frame once
        whole = [f for f in frames if widest.radius == 0 or (f == 0 and not widest.window_first_frame)]
        windowed = [f for f in frames if f not in whole]
        context = used[windowed]  # n x C x h x w
        own = [context_indices(t, s.context) for s in supersets]
        slots = [
            torch.tensor([windowed.index(f) for f in f_s if f in windowed], dtype=torch.long, device=features.device)
            for f_s in own
        ]
        windowed_frames = torch.tensor(windowed, dtype=torch.long, device=features.device)
        query = used[t]  # C x h x w: temperature 1
        for y0 in range(0, h, plan.rows_per_chunk):
            y1 = min(y0 + plan.rows_per_chunk, h)
            chunk = slice(y0 * w, y1 * w)
            targets = query[:, y0:y1].flatten(1)  # C x B
            whole_top = {f: (targets.T @ used[f].flatten(1)).topk(min(k, num), dim=-1) for f in whole}  # B x k'
            if windowed:
                logits, bias, cells, scored = plan.logits(context, query, y0, y1, widest.radius, widest.window, buffer)
                maxima = {}  # per context's frames: shared by the lattice points
                narrower = {}  # per context's frames: the last radius's (radius, best values, their cells)
            for graph, frames_s, slots_s in zip(graphs, own, slots):
                superset, radius = graph.superset, graph.superset.radius
                values = [whole_top[f].values for f in whole if f in frames_s]
                found_frames = [torch.full_like(whole_top[f].indices, f) for f in whole if f in frames_s]
                found_cells = [whole_top[f].indices for f in whole if f in frames_s]
                if len(slots_s):
                    if (y0, radius) not in biases:
                        biases[y0, radius] = _radius_bias(bias, cells, scored, y0, w, superset, widest)
                    key = tuple(slots_s.tolist())
                    if key not in maxima:
                        maxima[key] = _max_over_frames(logits, key)
                    # the k cells with the largest maximum over frames (top_overall's first step): from a narrower
                    # window's k and the cells this one adds to it, where the lattice has one (about one pass over
                    # the widest window instead of one per radius), else from the whole window
                    num_cells = min(k, bias.shape[-1])
                    if key in narrower and narrower[key][0] < radius:
                        inner, inner_best, inner_cell = narrower[key]
                        if (y0, inner, radius) not in rings:
                            rings[y0, inner, radius] = _ring(biases[y0, inner], biases[y0, radius])
                        index, valid = rings[y0, inner, radius]
                        added = (maxima[key].gather(-1, index) + biases[y0, radius].gather(-1, index)).masked_fill_(
                            ~valid, float("-inf")
                        )
                        best, pick = torch.cat([inner_best, added], dim=-1).topk(num_cells, dim=-1)
                        best_cell = torch.cat([inner_cell, index], dim=-1).gather(-1, pick)
                    else:
                        best, best_cell = (maxima[key] + biases[y0, radius]).topk(num_cells, dim=-1)
                    narrower[key] = (radius, best, best_cell)
                    top, slot, cell = top_overall(logits, biases[y0, radius], k, slots_s, (best, best_cell))
                    values.append(chunk_targets(top, scored, y1 - y0, w))
                    found_frames.append(chunk_targets(windowed_frames[slot], scored, y1 - y0, w))
                    found_cells.append(chunk_targets(cells.gather(-1, cell), scored, y1 - y0, w))
                if len(values) == 1:  # one source, already best first: its top-k is itself
                    top, found_frames, found_cells = values[0][:, :k], found_frames[0][:, :k], found_cells[0][:, :k]
                else:
                    top, pick = torch.cat(values, dim=1).topk(min(k, sum(v.shape[1] for v in values)), dim=-1)
                    found_frames = torch.cat(found_frames, dim=1).gather(1, pick)
                    found_cells = torch.cat(found_cells, dim=1).gather(1, pick)
                found = top.shape[1]  # < k only where the superset has fewer than k candidates
                graph.value[t - 1, chunk, :found] = top
                graph.frame[t - 1, chunk, :found] = found_frames.to(torch.int16)
                graph.location[t - 1, chunk, :found] = found_cells.to(graph.location.dtype)
    return graphs


def _ring(inner_bias: torch.Tensor, outer_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel cells (columns of the biases, ... x M) inside the outer window but not the inner one: per
    target, their columns first in order (... x W, padded to the widest target's W) and whether each is one."""
    ring = torch.isfinite(outer_bias) & ~torch.isfinite(inner_bias)
    width = max(1, int(ring.sum(dim=-1).max()))
    index = torch.argsort((~ring).to(torch.uint8), dim=-1, stable=True)[..., :width]
    return index, ring.gather(-1, index)


def _radius_bias(bias, cells, scored, y0, w, superset, widest):
    """The kernel's bias (target dims x M: -inf off the grid and outside the widest window) for `superset`'s
    narrower window: -inf also where a cell lies outside it. The target dims flatten row-major to `scored`."""
    if superset.radius == widest.radius:
        return bias
    dims = bias.shape[:-1]
    target_y = (y0 + torch.arange(scored[0], device=bias.device))[:, None].expand(scored).reshape(dims)
    target_x = torch.arange(scored[1], device=bias.device)[None, :].expand(scored).reshape(dims)
    inside = inside_window(
        cells // w - target_y[..., None], cells % w - target_x[..., None], superset.radius, superset.window
    )
    return bias.masked_fill(~inside, float("-inf"))


def _max_over_frames(logits: torch.Tensor, slots: tuple[int, ...]) -> torch.Tensor:
    """The maximum over the frames `slots` (sorted) of logits n x ... x M, laid out as one frame: each run of
    consecutive frames (a lattice point's are the first frame and its last few) is reduced as a view."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((slots[start], slots[i - 1] + 1))
            start = i
    out = torch.amax(logits[runs[0][0] : runs[0][1]], dim=0, out=torch.empty_like(logits[0]))
    for first, stop in runs[1:]:
        torch.maximum(out, torch.amax(logits[first:stop], dim=0), out=out)
    return out


# ---------------------------------------------------------------- one trial


def propagate_with_graph(
    graph: Graph, first_labels: torch.Tensor, cfg: PropagationConfig, stats: dict | None = None
) -> torch.Tensor:
    """What stt.propagation.propagate(graph.features, first_labels, cfg) returns: T x L x h x w soft
    labels (frame 0 = first_labels), from the graph's candidates.

    Raises ValueError with `serves`'s reason if the graph cannot serve cfg. stats, if given, gains
    "targets" (target locations predicted) and "fallbacks" (those computed the usual way).
    """
    reason = serves(graph, cfg)
    if reason is not None:
        raise ValueError(f"this graph cannot serve the setting: {reason}")
    features = graph.features
    check_inputs(features, first_labels, cfg)
    num_frames, num_labels = features.shape[0], first_labels.shape[0]
    h, w = graph.grid
    num = h * w
    cells = torch.arange(num, device=features.device)
    ys, xs = cells // w, cells % w
    normalized = None  # the features the fallbacks compare, made on the first fallback
    fallbacks = 0

    def predict(t: int, carried: torch.Tensor) -> torch.Tensor:  # carried: T x N x L
        nonlocal normalized, fallbacks
        weights, label_index, served = _select(graph, t, cfg, ys, xs)
        prediction = soft_copy(weights, label_index, carried.flatten(0, 1))
        missing = (~served).nonzero().squeeze(1)
        if len(missing):
            if normalized is None:
                normalized = F.normalize(features, dim=1) if cfg.normalize else features
            prediction[missing] = _exact_rows(normalized, carried, t, missing, cfg, (h, w))
            fallbacks += len(missing)
        return prediction

    # Labels as T x N x L (each candidate's label vector is one row: a gather) while propagating.
    first = first_labels.to(features.dtype).flatten(1).T
    predicted = propagate_frames(first, num_frames, predict, cfg.soft_labels, label_dim=1)
    if stats is not None:
        stats["targets"] = stats.get("targets", 0) + (num_frames - 1) * num
        stats["fallbacks"] = stats.get("fallbacks", 0) + fallbacks
    return predicted.transpose(1, 2).reshape(num_frames, num_labels, h, w).contiguous()


def _select(graph: Graph, t: int, cfg: PropagationConfig, ys: torch.Tensor, xs: torch.Tensor):
    """Target frame t's top-k under cfg from the cache: softmax weights and label rows f*N + i (N x k
    each), and whether each target is served exactly (N bool; else `_exact_rows` computes it).

    A candidate enters once per context slot that allows it: the first-frame slot (frame 0, in the
    window iff windowed), the queue slots (frames start .. t-1, in the window); with repeat_first_frame
    frame 0 can be in both, so its cells count twice in the top-k, as in stt.propagation.
    """
    value, frame, location = graph.value[t - 1], graph.frame[t - 1].long(), graph.location[t - 1].long()
    w = graph.grid[1]
    real = torch.isfinite(value)
    if cfg.radius == 0:
        inside = torch.ones_like(real)
    else:
        inside = inside_window(location // w - ys[:, None], location % w - xs[:, None], cfg.radius, cfg.window)
    first_slot = real & (frame == 0)
    if cfg.radius > 0 and cfg.window_first_frame:
        first_slot &= inside
    start = queue_start(t, cfg.context, cfg.repeat_first_frame)
    queue_slots = real & (frame >= start) & inside  # every cached frame is < t
    count = first_slot.sum(dim=1) + queue_slots.sum(dim=1)
    # A cache with a -inf in its last column holds every candidate its superset has: served whatever the count.
    served = (count >= cfg.topk) | ~real[:, -1]
    logits = value / cfg.temperature
    if start > 0:  # frame 0 is in the first slot only: each candidate enters once
        weights, pick = overall_weights(logits.masked_fill_(~(first_slot | queue_slots), float("-inf")), cfg.topk)
    else:
        both = torch.cat(
            [logits.masked_fill(~first_slot, float("-inf")), logits.masked_fill_(~queue_slots, float("-inf"))], dim=1
        )
        weights, pick = overall_weights(both, cfg.topk)  # N x k; serves() guarantees k <= K
        pick = pick % graph.k  # the slot copies of one candidate share its frame and location
    return weights, frame.gather(1, pick) * graph.value.shape[1] + location.gather(1, pick), served


def _exact_rows(
    features: torch.Tensor,
    carried: torch.Tensor,
    t: int,
    rows: torch.Tensor,
    cfg: PropagationConfig,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Soft labels (B x L) of target frame t's locations `rows` (B, sorted), computed the usual way: every
    allowed cell of every context slot, top-k, softmax, copy (stt.propagation.predict_dense's overall
    branch, restricted to these rows).

    features: T x C x h x w, normalised as cfg says; carried: T x N x L context labels. The rows go in
    groups whose grid rows span at most R + 1 (R = floor(radius)); a group's windowed slots are scored
    only against the band of grid rows its windows reach (rows y_first - R .. y_last + R), a view of the
    features that one matmul per slot reads in place, the cells of the band outside a target's window
    set to -inf. Gathering each target's window cells instead (per-target copies and matrix-vector
    products) was 3-30x slower than these matrix products on the 2-core CPU (1 thread, C = 256, grids
    30 x 54 and 60 x 107, radius 6-24, 20-300 targets), and one einsum over all slots 1.4-3.5x slower.
    """
    h, w = grid
    num = h * w
    context = context_indices(t, cfg.context, cfg.repeat_first_frame)
    first_windowed = first_windowed_frame(cfg, len(context))
    whole, windowed = context[:first_windowed], context[first_windowed:]
    reach = math.floor(cfg.radius) if windowed else h  # a group's rows may span reach + 1
    flat = features.flatten(2)  # T x C x N
    query = flat[t, :, rows] / cfg.temperature  # C x B, as predict_windowed's query
    labels = carried.flatten(0, 1)  # (T*N) x L: row f*N + i is frame f's label at location i
    ys = (rows // w).tolist()
    out = carried.new_empty((len(rows), carried.shape[2]))
    start = 0
    while start < len(rows):
        # the band's rows [top, bottom); a group spans at most reach + 1 grid rows
        band_top, widest = rows_reached(ys[start], ys[start] + reach + 1, reach, h)
        width = len(whole) * num + len(windowed) * (widest - band_top) * w
        end = start + 1
        while end < len(rows) and ys[end] - ys[start] <= reach and (end - start + 1) * width <= CHUNK_LOGITS:
            end += 1
        band_bottom = rows_reached(ys[start], ys[end - 1] + 1, reach, h)[1]
        out[start:end] = _rows_on_band(
            flat, labels, query[:, start:end], rows[start:end], whole, windowed, (band_top, band_bottom), cfg, grid
        )
        start = end
    return out


def _rows_on_band(flat, labels, query, rows, whole, windowed, band, cfg, grid):
    """One group of `_exact_rows`: soft labels (m x L) of targets `rows` (m) with queries `query` (C x m),
    `whole` context frames scored against every cell, `windowed` ones against the band's rows [top, bottom)."""
    h, w = grid
    num = h * w
    top, bottom = band
    band_cells = torch.arange(top * w, bottom * w, device=flat.device)
    logits = query.new_empty((rows.shape[0], len(whole) * num + len(windowed) * len(band_cells)))
    label_rows, at = [], 0
    for frame in whole:
        torch.matmul(query.T, flat[frame], out=logits[:, at : at + num])
        label_rows.append(frame * num + torch.arange(num, device=flat.device))
        at += num
    for frame in windowed:
        torch.matmul(query.T, flat[frame, :, top * w : bottom * w], out=logits[:, at : at + len(band_cells)])
        label_rows.append(frame * num + band_cells)
        at += len(band_cells)
    if windowed:
        outside = ~inside_window(
            band_cells[None, :] // w - (rows // w)[:, None],
            band_cells[None, :] % w - (rows % w)[:, None],
            cfg.radius,
            cfg.window,
        )  # m x band
        logits[:, num * len(whole) :].view(len(rows), len(windowed), -1).masked_fill_(
            outside[:, None, :], float("-inf")
        )
    weights, pick = overall_weights(logits, cfg.topk)  # m x k
    return soft_copy(weights, torch.cat(label_rows)[pick], labels)


# ---------------------------------------------------------------- on disk, beside the feature cache


def _superset_key(superset: PropagationConfig, k: int) -> str:
    """What a graph depends on besides the features: the superset fields that shape it, K, the format."""
    fields = {
        name: getattr(superset, name)
        for name in ("aggregation", "normalize", "context", "radius", "window", "window_first_frame")
    }
    return hashlib.sha256(json.dumps([GRAPH_VERSION, k, fields], sort_keys=True).encode()).hexdigest()[:16]


def graph_path(feature_file: Path, superset: PropagationConfig, k: int) -> Path:
    """Where the graph of the features cached at `feature_file` (stt.features.FeatureCache.path_for,
    whose name keys the feature source and the frames) lives: beside it, keyed by the superset and K."""
    feature_file = Path(feature_file)
    return feature_file.with_name(f"{feature_file.stem}.graph-{_superset_key(superset, k)}.pt")


def save_graph(graph: Graph, path: Path) -> None:
    """The graph's tensors and superset (not the features: they are in the feature cache) via torch.save."""
    save_atomically(
        {
            "version": GRAPH_VERSION,
            "value": graph.value.cpu(),
            "frame": graph.frame.cpu(),
            "location": graph.location.cpu(),
            "grid": list(graph.grid),
            "superset": dataclasses.asdict(graph.superset),
        },
        path,
    )


def load_graph(path: Path, features: torch.Tensor) -> Graph:
    """A saved graph (torch.load with weights_only=True), on the device of `features`, the features it was built on.
    On the CPU memory-mapped: the sweep's trial actors share its pages (a lattice of graphs at 480p is gigabytes)."""
    on_cpu = features.device.type == "cpu"
    state = torch.load(path, map_location=None if on_cpu else features.device, weights_only=True, mmap=on_cpu)
    if state.get("version") != GRAPH_VERSION:
        raise ValueError(f"{path}: graph format {state.get('version')}, expected {GRAPH_VERSION}")
    grid = tuple(state["grid"])
    if tuple(features.shape[2:]) != grid or features.shape[0] != state["value"].shape[0] + 1:
        raise ValueError(
            f"{path}: a graph of {state['value'].shape[0] + 1} frames on a {grid} grid, "
            f"features of shape {tuple(features.shape)}"
        )
    return Graph(
        state["value"], state["frame"], state["location"], grid, PropagationConfig(**state["superset"]), features
    )


def load_or_build(
    feature_file: Path,
    features: torch.Tensor | Callable[[], torch.Tensor],
    supersets: list[PropagationConfig],
    k: int,
    load: bool = True,
) -> tuple[list[Graph] | None, list[Path]]:
    """The graphs of these features under each of `supersets` (one, or a lattice: `build_graphs`) and k, from
    beside `feature_file`; those missing are built together and saved.

    features: the tensor, or a function returning it, called only when it is needed (a build, or a load).
    load=False: only make sure the files exist (the graphs returned are None; the features are not read when
    the files are there already, as when a resumed sweep finds its graphs)."""
    paths = [graph_path(feature_file, superset, k) for superset in supersets]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if not missing and not load:
        return None, paths
    features = features() if callable(features) else features
    built = dict(zip(missing, build_graphs(features, [supersets[i] for i in missing], k))) if missing else {}
    for i, graph in built.items():
        save_graph(graph, paths[i])
    if not load:
        return None, paths
    return [built[i] if i in built else load_graph(path, features) for i, path in enumerate(paths)], paths
