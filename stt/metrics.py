"""Evaluation metrics: DAVIS-2017 J and F, VIP mIoU, JHMDB PCK. Pure functions, numpy in, numbers out.

DAVIS-2017 semi-supervised (J = region IoU, F = boundary F-measure) reproduces the official
davisvideochallenge/davis2017-evaluation (davis2017/metrics.py, evaluation.py, davis.py,
results.py, utils.py; evaluation_method.py for the summary) result for result:

* Ground truth: void (255) is set to 0 (background) in every frame; the number of objects is the
  largest id in the FIRST ground-truth frame, so an id that first appears later is not scored.
  `_evaluate_semisupervised` is called with `all_void_masks=None`: void pixels are background
  for J and F, not excluded.
* The first and last frames are not scored (`all_gt_masks[:, 1:-1]`); the results' masks are
  read for the scored frames only.
* Results: objects are ids 1..(largest id in the scored result frames). More ids than the ground
  truth makes the official tool print a message and `sys.exit()` (status 0, no scores); here it
  is a ValueError naming the sequence and ids. Fewer ids are zero-padded (empty masks).
* J: intersection / union per frame, 1 where the union is empty.
* F: `seg2bmap` boundaries of both masks, each dilated with `cv2.dilate` and the kernel
  `skimage.morphology.disk(bound_pix)`, `bound_pix = ceil(0.008 * hypot(H, W))`; precision is
  the share of predicted boundary pixels within the dilated ground-truth boundary, recall the
  converse. Empty boundaries: prediction empty and ground truth not -> P=1, R=0; the converse
  -> P=0, R=1; both empty -> P=R=1. F = 2PR/(P+R), 0 when P+R=0.
* Per (sequence, object) entry: Mean (nanmean), Recall (nanmean of value > 0.5) and Decay
  (`db_statistics`, see there for the bin indices and their uint8 quirk). The summary means
  are plain `np.mean` over entries, not over sequences, so a 3-object sequence weighs 3x.

Speed: the official code computes boundaries and dilations on full frames. Here all counts of
a frame (intersection, union, boundary pixels, boundary matches) are taken on the box around
the two masks plus one pixel, where they are identical (see `_frame_counts`), and P, R, F and J
are formed with the official float64 operations, so results are bit-identical.

VIP (semantic part propagation, 20 classes) follows the VIP evaluation script shipped with CRW
(ajabri, `fast_hist`/`show_result`) and VFS's `VIPDataset.vip_evaluate` (mmseg `mean_iou`,
`ignore_index=255`): one confusion matrix (rows ground truth, columns prediction) summed over
every annotated frame of every video; ground-truth pixels outside [0, num_classes) - in
practice 255 - are ignored; IoU_c = diag / (row + column - diag) and the mean is `np.nanmean`,
so a class absent from both ground truth and prediction (0/0) is left out of the mean.

JHMDB PCK follows CRW's code/eval/eval_pck.py (the same script as UVC's and VFS's):
per frame, the reference size is 0.6 x the diagonal of the bounding box of that frame's
ground-truth joints; a joint counts as correct when distance / size <= alpha; frame 0 (the
given annotation) is skipped; a joint whose predicted x is negative (CRW writes -1 for a joint
whose label map is empty) is skipped and left out of the box; correct/total is accumulated per
joint over all frames of all videos, and PCK is the mean over joints of the per-joint
percentages (the pooled ratio is commented out in the official script).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
from skimage.morphology import disk

DAVIS_SUMMARY_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
VIP_NUM_CLASSES = 20
VIP_IGNORE_LABEL = 255
_DAVIS_VOID_LABEL = 255


# ----------------------------------------------------------------------------------- DAVIS


def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """Region similarity J per frame: (..., H, W) bool masks each -> (...,) float64.

    An empty union scores 1 (nothing to find, nothing found).
    """
    annotation, segmentation = _same_shape_bool(annotation, segmentation, "db_eval_iou")
    intersection = np.count_nonzero(annotation & segmentation, axis=(-2, -1))
    union = np.count_nonzero(annotation | segmentation, axis=(-2, -1))
    return _iou_from_counts(intersection, union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a mask: (..., H, W) -> (..., H, W) bool.

    A pixel is on the boundary when it differs from its right, lower or lower-right neighbour
    (boundaries sit half a pixel towards the origin); the last row compares only to the right,
    the last column only downwards, and the bottom-right pixel is never a boundary. This is the
    official `_seg2bmap` (D. Martin, 2003) without its rescaling branch, which evaluation never
    uses.
    """
    seg = np.asarray(seg).astype(bool)
    if seg.ndim < 2:
        raise ValueError(f"seg2bmap expects (..., H, W) masks, got shape {seg.shape}")
    right = np.zeros_like(seg)
    down = np.zeros_like(seg)
    down_right = np.zeros_like(seg)
    right[..., :, :-1] = seg[..., :, 1:]
    down[..., :-1, :] = seg[..., 1:, :]
    down_right[..., :-1, :-1] = seg[..., 1:, 1:]
    bmap = (seg ^ right) | (seg ^ down) | (seg ^ down_right)
    bmap[..., -1, :] = seg[..., -1, :] ^ right[..., -1, :]
    bmap[..., :, -1] = seg[..., :, -1] ^ down[..., :, -1]
    bmap[..., -1, -1] = False
    return bmap


def boundary_radius(height: int, width: int, bound_th: float = 0.008) -> int:
    """Dilation radius in pixels: `bound_th` of the image diagonal, rounded up (>= 1: pixels)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(np.ceil(bound_th * np.linalg.norm((height, width))))


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, bound_th: float = 0.008) -> np.ndarray:
    """Boundary F-measure per frame: (T, H, W) or (H, W) bool masks -> (T,) float64 or a float."""
    annotation, segmentation = _same_shape_bool(annotation, segmentation, "db_eval_boundary")
    if annotation.ndim not in (2, 3):
        raise ValueError(f"db_eval_boundary expects (T, H, W) or (H, W) masks, got shape {annotation.shape}")
    kernel = disk(boundary_radius(*annotation.shape[-2:], bound_th)).astype(np.uint8)
    frames = zip(annotation.reshape(-1, *annotation.shape[-2:]), segmentation.reshape(-1, *annotation.shape[-2:]))
    _, f = _j_and_f(frames, kernel)
    return f if annotation.ndim == 3 else float(f[0])


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """Mean, recall and decay of one entry's per-frame values (T,), as official `db_statistics`.

    Mean and recall are NaN-aware means (a NaN frame counts as not recalled). Decay is the mean
    of the first quarter minus the mean of the last quarter, the quarters being
    `values[ids[i]:ids[i+1]+1]` with `ids = round(linspace(1, T, 5) + 1e-10) - 1` (bins share
    their edge frames). The official code casts `ids` to uint8 and adds 1 in uint8, so indices
    wrap modulo 256 for sequences of more than 256 scored frames (never the case on DAVIS,
    at most 104 frames); the wrap is reproduced, not fixed, so long sequences match the tool.
    """
    values = np.asarray(per_frame_values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"db_statistics expects per-frame values of shape (T,), got {values.shape}")
    mean = _nanmean(values)
    recall = _nanmean(values > 0.5)
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64) % 256
    bins = [values[ids[i] : (ids[i + 1] + 1) % 256] for i in range(4)]
    decay = _nanmean(bins[0]) - _nanmean(bins[3])
    return mean, recall, decay


def evaluate_davis_sequence(gt_masks: np.ndarray, pred_masks: np.ndarray, name: str) -> list[dict]:
    """Score one sequence: one row per ground-truth object, as the official semi-supervised path.

    gt_masks, pred_masks: (T, H, W) integer id maps for ALL T >= 3 frames of the sequence,
    including the first (given) and last frames, which are not scored; gt may hold void (255).
    Returns rows {"sequence": name, "object": k, "entry": f"{name}_{k}" (the official CSV's
    "Sequence" column), "J": (T-2,), "F": (T-2,), "J-Mean", "J-Recall", "J-Decay", "F-Mean",
    "F-Recall", "F-Decay"} for k = 1..(largest id in gt frame 0).
    """
    gt = _id_maps(gt_masks, f"sequence {name!r}: ground truth")
    pred = _id_maps(pred_masks, f"sequence {name!r}: prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"sequence {name!r}: prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if gt.shape[0] < 3:
        raise ValueError(
            f"sequence {name!r}: needs at least 3 frames (first and last are not scored), got {gt.shape[0]}"
        )

    # Void is background: it never equals an object id below, so only frame 0's max must skip it.
    first = gt[0]
    num_objects = int(first[first != _DAVIS_VOID_LABEL].max(initial=0))
    gt, pred = gt[1:-1], pred[1:-1]
    pred_max = int(pred.max())
    if pred_max > num_objects:
        extra = sorted(int(i) for i in np.unique(pred) if i > num_objects)
        raise ValueError(
            f"sequence {name!r}: prediction has object ids {extra} but the first ground-truth frame "
            f"has only ids 1..{num_objects} (the official tool stops here without scores)"
        )

    kernel = disk(boundary_radius(*gt.shape[-2:])).astype(np.uint8)
    rows = []
    for obj in range(1, num_objects + 1):
        j, f = _j_and_f(((gt_frame == obj, pred_frame == obj) for gt_frame, pred_frame in zip(gt, pred)), kernel)
        row = {"sequence": name, "object": obj, "entry": f"{name}_{obj}", "J": j, "F": f}
        for metric, values in (("J", j), ("F", f)):
            row[f"{metric}-Mean"], row[f"{metric}-Recall"], row[f"{metric}-Decay"] = db_statistics(values)
        rows.append(row)
    return rows


def summarize_davis(rows: Sequence[dict]) -> dict[str, float]:
    """The official global table from all (sequence, object) rows: plain means over entries."""
    if len(rows) == 0:
        raise ValueError("summarize_davis: no (sequence, object) rows to summarise")
    mean = {key: float(np.mean([row[key] for row in rows])) for key in DAVIS_SUMMARY_KEYS[1:]}
    return {"J&F-Mean": (mean["J-Mean"] + mean["F-Mean"]) / 2.0, **mean}


def _j_and_f(mask_pairs: Iterable[tuple[np.ndarray, np.ndarray]], kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """J and F per frame, (T,) float64 each, from T (gt mask, predicted mask) pairs of (H, W) bool."""
    counts = np.array([_frame_counts(gt, pred, kernel) for gt, pred in mask_pairs], dtype=np.int64).reshape(-1, 6)
    intersection, union, n_fg, n_gt, fg_match, gt_match = counts.T

    # Official f_measure, vectorised over frames with the same float64 operations in the same order.
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = fg_match / n_fg.astype(np.float64)
        recall = gt_match / n_gt.astype(np.float64)
    precision = np.where(n_fg == 0, 1.0, np.where(n_gt == 0, 0.0, precision))
    recall = np.where(n_gt == 0, 1.0, np.where(n_fg == 0, 0.0, recall))
    denominator = precision + recall
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 2 * precision * recall / denominator
    return _iou_from_counts(intersection, union), np.where(denominator == 0, 0.0, f)


def _frame_counts(gt: np.ndarray, pred: np.ndarray, kernel: np.ndarray) -> tuple[int, ...]:
    """(intersection, union, n_fg, n_gt, fg_match, gt_match) of one frame's (H, W) bool masks.

    n_fg / n_gt: boundary pixels of the prediction / gt; fg_match: predicted boundary pixels
    within the dilated gt boundary; gt_match the converse. Everything is computed on the box
    around both masks plus one pixel (boundaries sit half a pixel towards the origin, and a
    row or column of background keeps seg2bmap's last-row/last-column rule from firing inside
    the image); outside it there are no mask or boundary pixels, and cv2.dilate ignores pixels
    beyond the array, so the counts equal the official full-frame ones.
    """
    rows = np.flatnonzero(gt.any(axis=1) | pred.any(axis=1))
    if rows.size == 0:
        return 0, 0, 0, 0, 0, 0
    cols = np.flatnonzero(gt.any(axis=0) | pred.any(axis=0))
    box = slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)
    gt, pred = gt[box], pred[box]
    intersection = np.count_nonzero(gt & pred)
    union = np.count_nonzero(gt | pred)
    fg_boundary = seg2bmap(pred).view(np.uint8)
    gt_boundary = seg2bmap(gt).view(np.uint8)
    n_fg, n_gt = np.count_nonzero(fg_boundary), np.count_nonzero(gt_boundary)
    if n_fg == 0 or n_gt == 0:
        return intersection, union, n_fg, n_gt, 0, 0
    fg_match = np.count_nonzero(fg_boundary & cv2.dilate(gt_boundary, kernel))
    gt_match = np.count_nonzero(gt_boundary & cv2.dilate(fg_boundary, kernel))
    return intersection, union, n_fg, n_gt, fg_match, gt_match


def _iou_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
    return np.where(union == 0, 1.0, iou)


def _nanmean(values: np.ndarray) -> float:
    """np.nanmean (same summation, same bits) without its all-NaN / empty-slice warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.nanmean(values))


def _same_shape_bool(annotation: np.ndarray, segmentation: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    annotation, segmentation = np.asarray(annotation), np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"{what}: annotation shape {annotation.shape} != segmentation shape {segmentation.shape}")
    if annotation.ndim < 2:
        raise ValueError(f"{what}: expected (..., H, W) masks, got shape {annotation.shape}")
    return annotation.astype(bool), segmentation.astype(bool)


def _id_maps(masks: np.ndarray, what: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{what}: expected (T, H, W) id maps, got shape {masks.shape}")
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"{what}: expected integer object ids, got dtype {masks.dtype}")
    if masks.size and masks.min() < 0:
        raise ValueError(f"{what}: negative object id {int(masks.min())}")
    return masks


# ------------------------------------------------------------------------------------- VIP


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int = VIP_NUM_CLASSES, ignore_label: int = VIP_IGNORE_LABEL
) -> np.ndarray:
    """Pixel counts (num_classes, num_classes) int64, [gt class, predicted class], of one frame.

    gt, pred: same-shape integer label maps. gt pixels equal to `ignore_label` are skipped; any
    other gt value must be a class, and every predicted value must be a class.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"confusion_matrix: gt shape {gt.shape} != pred shape {pred.shape}")
    for what, labels in (("gt", gt), ("pred", pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"confusion_matrix: {what} must hold integer labels, got dtype {labels.dtype}")
    valid = gt != ignore_label
    gt_valid, pred_valid = gt[valid].astype(np.int64), pred.astype(np.int64).ravel()
    if gt_valid.size and (gt_valid.min() < 0 or gt_valid.max() >= num_classes):
        bad = sorted({int(v) for v in np.unique(gt_valid) if not 0 <= v < num_classes})
        raise ValueError(f"confusion_matrix: gt labels {bad} are neither in [0, {num_classes}) nor {ignore_label}")
    if pred_valid.size and (pred_valid.min() < 0 or pred_valid.max() >= num_classes):
        bad = sorted({int(v) for v in np.unique(pred_valid) if not 0 <= v < num_classes})
        raise ValueError(f"confusion_matrix: predicted labels {bad} are not in [0, {num_classes})")
    pair = gt_valid * num_classes + pred[valid].astype(np.int64)
    return np.bincount(pair, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU (C,)) from a summed confusion matrix (C, C) [gt, pred].

    A class with an empty union (absent from gt and prediction) has IoU NaN and is left out of
    the mean, as the public VIP scripts do with `np.nanmean`.
    """
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"mean_iou: expected a square confusion matrix, got shape {conf.shape}")
    intersection = np.diag(conf).astype(np.float64)
    union = conf.sum(axis=1) + conf.sum(axis=0) - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = intersection / union
    if np.isnan(per_class).all():
        raise ValueError("mean_iou: the confusion matrix is empty (no scored pixels)")
    return float(np.nanmean(per_class)), per_class


# ----------------------------------------------------------------------------------- JHMDB


def pck(
    pred: np.ndarray | Sequence[np.ndarray], gt: np.ndarray | Sequence[np.ndarray], alphas: Sequence[float] = (0.1, 0.2)
) -> dict[str, float]:
    """JHMDB PCK in percent, {"PCK@0.1": ..., ...}, over one video or a list of videos.

    pred, gt: (T, J, 2) pixel coordinates (x, y) of J joints, 0-based (JHMDB's `pos_img` minus
    1), or equal-length lists of such arrays, one per video. Frame 0 of every video is skipped.
    """
    preds = [pred] if isinstance(pred, np.ndarray) else list(pred)
    gts = [gt] if isinstance(gt, np.ndarray) else list(gt)
    if len(preds) != len(gts) or not preds:
        raise ValueError(f"pck: got {len(preds)} predicted and {len(gts)} ground-truth videos")
    distances = np.concatenate([_normalised_joint_distances(p, g, i) for i, (p, g) in enumerate(zip(preds, gts))])
    scored = ~np.isnan(distances)  # (frames, J): NaN marks skipped joints
    totals = scored.sum(axis=0)
    if (totals == 0).any():
        raise ValueError(f"pck: joints {np.flatnonzero(totals == 0).tolist()} are never scored")
    results = {}
    for alpha in alphas:
        with np.errstate(invalid="ignore"):
            correct = (distances <= alpha).sum(axis=0)  # NaN (skipped) and inf compare False
        results[f"PCK@{alpha:g}"] = float(np.mean(100.0 * correct / totals))
    return results


def _normalised_joint_distances(pred: np.ndarray, gt: np.ndarray, video: int) -> np.ndarray:
    """distance / (0.6 x gt box diagonal) for frames 1..T-1: (T-1, J), NaN where skipped."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"pck video {video}: expected pred and gt of the same shape (T, J, 2), got {pred.shape} and {gt.shape}"
        )
    visible = ~(pred[..., 0] < 0)
    # Box of the visible gt joints, seeded like the official loop (min from 1e6, max from -1).
    box_min = np.minimum(np.where(visible[..., None], gt, 1e6).min(axis=1), 1e6)
    box_max = np.maximum(np.where(visible[..., None], gt, -1.0).max(axis=1), -1.0)
    size = 0.6 * np.linalg.norm(box_max - box_min, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = np.linalg.norm(pred - gt, axis=-1) / size[:, None]
    # A 0/0 (prediction on the gt joint of a one-point box) is NaN in the official code too,
    # so it scores wrong; map it to inf to keep NaN for "skipped".
    normalised = np.where(np.isnan(normalised), np.inf, normalised)
    return np.where(visible, normalised, np.nan)[1:]
