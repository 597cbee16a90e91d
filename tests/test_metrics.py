"""stt.metrics against hand-computed values and a line-by-line port of the official DAVIS code."""

import math

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.morphology import disk

from stt.metrics import (
    DAVIS_SUMMARY_KEYS,
    boundary_radius,
    confusion_matrix,
    db_eval_boundary,
    db_eval_iou,
    db_statistics,
    evaluate_davis_sequence,
    mean_iou,
    pck,
    seg2bmap,
    summarize_davis,
)


def box(shape, top, left, height, width, value=1, dtype=np.uint8):
    mask = np.zeros(shape, dtype=dtype)
    mask[top : top + height, left : left + width] = value
    return mask


def official_f_measure(foreground_mask, gt_mask, bound_th=0.008):
    """davis2017-evaluation metrics.f_measure + _seg2bmap, transcribed (no void, no rescaling)."""

    def official_seg2bmap(seg):
        seg = seg.astype(bool)
        e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
        e[:, :-1] = seg[:, 1:]
        s[:-1, :] = seg[1:, :]
        se[:-1, :-1] = seg[1:, 1:]
        b = seg ^ e | seg ^ s | seg ^ se
        b[-1, :] = seg[-1, :] ^ e[-1, :]
        b[:, -1] = seg[:, -1] ^ s[:, -1]
        b[-1, -1] = 0
        return b

    bound_pix = np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary = official_seg2bmap(foreground_mask)
    gt_boundary = official_seg2bmap(gt_mask)
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), disk(bound_pix).astype(np.uint8))
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), disk(bound_pix).astype(np.uint8))
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def official_iou(annotation, segmentation):
    inters = np.sum(segmentation & annotation, axis=(-2, -1))
    union = np.sum(segmentation | annotation, axis=(-2, -1))
    j = inters / union
    j[np.isclose(union, 0)] = 1
    return j


# ------------------------------------------------------------------------------ J and F


def test_bound_pix_of_480p_is_8_and_odd_width():
    assert boundary_radius(480, 854) == 8  # ceil(0.008 * 979.6)
    assert boundary_radius(240, 345) == 4  # ceil(0.008 * 420.2)


def test_iou_of_known_boxes():
    gt = box((40, 60), 10, 10, 10, 10).astype(bool)
    pred = box((40, 60), 10, 15, 10, 10).astype(bool)  # overlap 10x5: 50 / (100 + 100 - 50)
    assert db_eval_iou(gt, pred) == pytest.approx(1 / 3, abs=1e-15)
    np.testing.assert_array_equal(db_eval_iou(np.stack([gt, gt]), np.stack([pred, gt])), [50 / 150, 1.0])


@pytest.mark.parametrize(
    ("shape", "side", "radius"),
    [((480, 854), 100, 8), ((240, 345), 60, 4)],  # 345: odd width
)
def test_boundary_f_shift_by_radius_and_one_more(shape, side, radius):
    # seg2bmap of a side x side box is the outline of a (side+1)^2 square: 4*side pixels.
    # Shifted right by radius, every outline pixel has a partner within the disk: F = 1.
    # Shifted by radius+1, the gt's left column (side+1 px) and right-column pixels more than
    # `radius` rows from a corner are unmatched; matched: top and bottom rows except the left
    # corner (2*side) + 2*radius right-column pixels. Symmetric, so P = R = F.
    gt = box(shape, 100, 150, side, side).astype(bool)
    assert np.count_nonzero(seg2bmap(gt)) == 4 * side
    shifted = box(shape, 100, 150 + radius, side, side).astype(bool)
    assert db_eval_boundary(gt, shifted) == 1.0
    shifted = box(shape, 100, 150 + radius + 1, side, side).astype(bool)
    expected = (2 * side + 2 * radius) / (4 * side)  # 216/400 = 0.54 at 480x854
    assert db_eval_boundary(gt, shifted) == pytest.approx(expected, rel=1e-14)
    assert db_eval_boundary(gt, shifted) == official_f_measure(shifted, gt)


def test_empty_masks():
    empty = np.zeros((3, 30, 40), dtype=bool)
    full = np.stack([box((30, 40), 5, 5, 10, 10).astype(bool)] * 3)
    np.testing.assert_array_equal(db_eval_iou(empty, empty), [1, 1, 1])
    np.testing.assert_array_equal(db_eval_boundary(empty, empty), [1, 1, 1])
    np.testing.assert_array_equal(db_eval_iou(full, empty), [0, 0, 0])  # gt present, nothing predicted
    np.testing.assert_array_equal(db_eval_boundary(full, empty), [0, 0, 0])  # P = 1, R = 0
    np.testing.assert_array_equal(db_eval_boundary(empty, full), [0, 0, 0])  # P = 0, R = 1


def test_seg2bmap_matches_hand_drawn_outline():
    seg = np.zeros((5, 6), dtype=bool)
    seg[1:3, 2:4] = True
    expected = np.array(
        [
            [0, 1, 1, 1, 0, 0],
            [0, 1, 0, 1, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(seg2bmap(seg), expected)
    # The last row compares only to the right and the last column only downwards, so a mask
    # reaching the bottom-right image border has no boundary along that border.
    edge = np.zeros((3, 3), dtype=bool)
    edge[1:, 1:] = True
    np.testing.assert_array_equal(seg2bmap(edge), [[1, 1, 1], [1, 0, 0], [1, 0, 0]])


def test_matches_official_port_on_random_blobs():
    rng = np.random.default_rng(0)
    for shape in [(64, 97), (33, 345)]:
        noise = [cv2.GaussianBlur(rng.random(shape), (0, 0), 3) for _ in range(8)]
        masks = [n > np.quantile(n, q) for n, q in zip(noise, [0.5, 0.7, 0.9, 0.99, 0.3, 0.6, 0.8, 1.0])]
        gt, pred = np.stack(masks[:4]), np.stack(masks[4:])
        expected_f = [official_f_measure(p, g) for g, p in zip(gt, pred)]
        assert db_eval_boundary(gt, pred).tolist() == expected_f  # bit-identical
        assert db_eval_iou(gt, pred).tolist() == official_iou(gt, pred).tolist()


# ---------------------------------------------------------------------------- statistics


def test_db_statistics_decay_bins():
    # T = 10: ids = round(linspace(1, 10, 5) + 1e-10) - 1 = [0, 2, 5, 7, 9];
    # first bin values[0:3] mean 0.1, last bin values[7:10] mean 0.8.
    mean, recall, decay = db_statistics(np.arange(10) / 10)
    assert mean == pytest.approx(0.45)
    assert recall == pytest.approx(0.4)  # 0.6, 0.7, 0.8, 0.9
    assert decay == pytest.approx(0.1 - 0.8)
    # T = 6: ids = [0, 1, 3, 4, 5] (2.25 -> 2, 3.5 + 1e-10 -> 4, 4.75 -> 5)
    _, _, decay = db_statistics(np.array([1.0, 0.5, 0.2, 0.2, 0.0, 0.3]))
    assert decay == pytest.approx(0.75 - 0.15)


def test_db_statistics_nan_and_uint8_wrap():
    mean, recall, _ = db_statistics(np.array([np.nan, 1.0, 1.0, 0.0]))
    assert mean == pytest.approx(2 / 3)
    assert recall == 0.5  # NaN is not > 0.5 but stays in the denominator
    # 300 scored frames: ids [0, 75, 150, 224, 299] wrap to 299 % 256 = 43 in uint8, so the last
    # bin values[224:44] is empty and the official decay is NaN.
    _, _, decay = db_statistics(np.linspace(1, 0, 300))
    assert math.isnan(decay)
    # 256 frames: ids [0, 64, 128, 191, 255]; 255 + 1 wraps to 0 in uint8 -> last bin empty.
    _, _, decay = db_statistics(np.ones(256))
    assert math.isnan(decay)
    # 255 frames, no wrap: ids [0, 64, 127, 191, 254]; v_i = 1 - i/254, so the first bin
    # v[0:65] has mean 1 - 32/254 and the last v[191:255] mean 1 - 222.5/254.
    _, _, decay = db_statistics(np.linspace(1, 0, 255))
    assert decay == pytest.approx(190.5 / 254)


# ------------------------------------------------------------------------------ sequences


def make_sequence(frames, shape, boxes):
    """(T, H, W) uint8 id maps; boxes: {id: (top, left, height, width)} in every frame."""
    masks = np.zeros((frames, *shape), dtype=np.uint8)
    for obj, (top, left, height, width) in boxes.items():
        masks[:, top : top + height, left : left + width] = obj
    return masks


def test_sequence_perfect_prediction_and_first_last_frames_ignored():
    gt = make_sequence(5, (40, 50), {1: (5, 5, 10, 10), 2: (20, 25, 8, 12)})
    pred = gt.copy()
    pred[0] = 7  # extra ids and garbage in the first and last frames are never read
    pred[-1] = 0
    rows = evaluate_davis_sequence(gt, pred, "seq")
    assert [(r["sequence"], r["object"], r["entry"]) for r in rows] == [("seq", 1, "seq_1"), ("seq", 2, "seq_2")]
    for row in rows:
        assert row["J"].shape == row["F"].shape == (3,)
        assert row["J-Mean"] == row["F-Mean"] == row["J-Recall"] == row["F-Recall"] == 1.0
        assert row["J-Decay"] == row["F-Decay"] == 0.0


def test_missing_object_is_zero_padded():
    gt = make_sequence(4, (40, 50), {1: (5, 5, 10, 10), 2: (20, 25, 8, 12)})
    pred = np.where(gt == 2, 0, gt).astype(np.uint8)
    rows = evaluate_davis_sequence(gt, pred, "seq")
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[1]["J"], [0, 0])
    np.testing.assert_array_equal(rows[1]["F"], [0, 0])
    assert rows[0]["J-Mean"] == 1.0


def test_object_appearing_after_frame_0_is_not_scored():
    gt = make_sequence(4, (40, 50), {1: (5, 5, 10, 10)})
    gt[2:, 20:30, 20:30] = 2  # object 2 enters at frame 2: background for scoring
    pred = make_sequence(4, (40, 50), {1: (5, 5, 10, 10)})
    rows = evaluate_davis_sequence(gt, pred, "late")
    assert len(rows) == 1 and rows[0]["J-Mean"] == 1.0 and rows[0]["F-Mean"] == 1.0
    with pytest.raises(ValueError, match=r"'late'.*\[2\].*1\.\.1"):
        evaluate_davis_sequence(gt, gt, "late")  # predicting object 2 is an extra id


def test_extra_result_id_raises():
    gt = make_sequence(4, (40, 50), {1: (5, 5, 10, 10)})
    pred = gt.copy()
    pred[1, 30:35, 30:35] = 3
    with pytest.raises(ValueError, match=r"sequence 'bear'.*\[3\]"):
        evaluate_davis_sequence(gt, pred, "bear")


def test_void_counts_as_background():
    # gt: object 10x10 with a 10x5 void (255) band beside it; pred covers object and band.
    gt = make_sequence(3, (40, 50), {1: (5, 5, 10, 10)})
    gt[:, 5:15, 15:20] = 255
    pred = make_sequence(3, (40, 50), {1: (5, 5, 10, 15)})
    (row,) = evaluate_davis_sequence(gt, pred, "void")
    assert row["J"][0] == pytest.approx(100 / 150)  # the band is a false positive, not ignored
    gt_object = np.where(gt == 255, 0, gt)[1] == 1
    assert row["F"][0] == official_f_measure(pred[1] == 1, gt_object)
    assert row["F"][0] < 1.0


def test_bad_sequence_inputs_raise():
    gt = make_sequence(4, (10, 10), {1: (1, 1, 3, 3)})
    with pytest.raises(ValueError, match="prediction shape"):
        evaluate_davis_sequence(gt, gt[:, :5], "s")
    with pytest.raises(ValueError, match="at least 3 frames"):
        evaluate_davis_sequence(gt[:2], gt[:2], "s")
    with pytest.raises(ValueError, match="integer"):
        evaluate_davis_sequence(gt, gt.astype(np.float32), "s")


def test_summary_is_mean_over_entries_not_sequences():
    gt_a = make_sequence(4, (30, 40), {1: (2, 2, 8, 8)})
    gt_b = make_sequence(4, (30, 40), {1: (2, 2, 5, 5), 2: (10, 10, 5, 5), 3: (20, 20, 5, 5)})
    rows = evaluate_davis_sequence(gt_a, gt_a, "a")  # one perfect entry
    rows += evaluate_davis_sequence(gt_b, np.zeros_like(gt_b), "b")  # three empty predictions
    summary = summarize_davis(rows)
    assert tuple(summary) == DAVIS_SUMMARY_KEYS
    assert summary["J-Mean"] == summary["F-Mean"] == summary["J&F-Mean"] == 0.25  # not (1 + 0) / 2
    assert summary["J-Recall"] == summary["F-Recall"] == 0.25
    assert summary["J-Decay"] == summary["F-Decay"] == 0.0
    with pytest.raises(ValueError, match="no"):
        summarize_davis([])


def load_sequence(root, name):
    paths = sorted((root / "Annotations" / "480p" / name).glob("*.png"))
    return np.stack([np.array(Image.open(p)) for p in paths])


def test_real_davis_sequence_matches_official_port(davis_real_root):
    gt = load_sequence(davis_real_root, "blackswan")
    # previous frame's mask moved 10 px right: a realistic imperfect result
    pred = np.roll(np.concatenate([gt[:1], gt[:-1]]), 10, axis=2)
    (row,) = evaluate_davis_sequence(gt, pred, "blackswan")
    gt_obj, pred_obj = gt[1:-1] == 1, pred[1:-1] == 1
    assert row["J"].tolist() == official_iou(gt_obj, pred_obj).tolist()
    assert row["F"].tolist() == [official_f_measure(p, g) for g, p in zip(gt_obj, pred_obj)]
    assert 0.5 < row["J-Mean"] < 1.0 and 0.5 < row["F-Mean"] < 1.0


# ------------------------------------------------------------------------------------- VIP


def test_vip_confusion_and_miou_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [1, 1, 0]], dtype=np.uint8)
    conf = confusion_matrix(gt, pred, num_classes=4)  # class 3 absent from both
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 1] = 1, 1, 2, 1
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64
    miou, per_class = mean_iou(conf)
    # IoU0 = 1 / (2 + 1 - 1), IoU1 = 2 / (2 + 4 - 2), IoU2 = 0 / (1 + 0 - 0), IoU3 = 0/0 -> left out
    np.testing.assert_allclose(per_class[:3], [0.5, 0.5, 0.0])
    assert math.isnan(per_class[3])
    assert miou == pytest.approx(1 / 3)
    # accumulated over frames: the second frame is perfect and adds 6 pixels of class 2
    conf += confusion_matrix(np.full((2, 3), 2, np.uint8), np.full((2, 3), 2, np.uint8), num_classes=4)
    miou, per_class = mean_iou(conf)
    assert per_class[2] == pytest.approx(6 / 7)
    assert miou == pytest.approx((0.5 + 0.5 + 6 / 7) / 3)


def test_vip_bad_labels_raise():
    gt = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"gt labels \[20\]"):
        confusion_matrix(np.full((2, 2), 20, np.uint8), gt)
    with pytest.raises(ValueError, match=r"predicted labels \[21\]"):
        confusion_matrix(gt, np.full((2, 2), 21, np.uint8))
    with pytest.raises(ValueError, match="empty"):
        mean_iou(np.zeros((20, 20), dtype=np.int64))


# ------------------------------------------------------------------------------------ PCK

CORNERS = np.array([[0, 0], [30, 0], [0, 40], [30, 40]], dtype=np.float64)  # box diagonal 50


def test_pck_per_frame_box_by_hand():
    # frame 1: box 30x40 -> size 0.6 * 50 = 30; frame 2: doubled skeleton -> size 60.
    gt = np.stack([CORNERS, CORNERS, 2 * CORNERS])
    errors = np.array([[[99, 99]] * 4, [[0, 0], [3, 0], [0, 4], [6, 8]], [[2, 0], [0, 5], [6, 0], [0, 7]]])
    pred = gt + errors  # frame 0 is off by 140 px but is never scored
    # alpha 0.1: frame 1 tolerates 3 px (0, 3 ok; 4, 10 not), frame 2 tolerates 6 (2, 5, 6 ok)
    #   per joint: 100, 100, 50, 0 -> 62.5
    # alpha 0.2: frame 1 tolerates 6 (0, 3, 4 ok), frame 2 tolerates 12 (all ok) -> 100, 100, 100, 50
    assert pck(pred, gt) == {"PCK@0.1": 62.5, "PCK@0.2": 87.5}


def test_pck_skips_negative_predictions_and_pools_videos():
    gt = np.stack([np.vstack([CORNERS, [[1000, 1000]]])] * 2)  # joint 4 far away
    pred = gt.copy()
    pred[1, :4] += [[4, 0], [0, 0], [0, 0], [0, 0]]
    pred[1, 4] = [-1, -1]  # not predicted: out of the box and out of the score in this frame
    video_b = (gt.copy(), gt.copy())  # perfect second video scores joint 4
    result = pck([pred, video_b[0]], [gt, video_b[1]], alphas=(0.1,))
    # joint 0: 4 px > 3 in video a, ok in video b -> 50; others 100; joint 4 only in video b -> 100
    assert result == {"PCK@0.1": pytest.approx((50 + 100 * 4) / 5)}
    with pytest.raises(ValueError, match=r"joints \[4\] are never scored"):
        pck(pred, gt)
    with pytest.raises(ValueError, match="same shape"):
        pck(pred[:, :3], gt)
