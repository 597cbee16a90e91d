"""The evaluation CLI honours DESIGN.md's contracts on the tiny synthetic set and on real DAVIS frames."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stt.data.layouts import DAVIS
from stt.data.synthetic import generate
from stt.evaluate import main, score_davis

KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


def copy_ground_truth(dataset: DAVIS, out):
    """The ground truth as a results folder, keeping only the objects of the first frame (the
    synthetic set has late-appearing objects, whose ids the official tool refuses in results)."""
    for seq in dataset.sequences:
        (out / seq).mkdir(parents=True)
        masks = dataset.read_masks(seq)
        masks[(masks > dataset.num_objects(seq))] = 0
        for mask, path in zip(masks, dataset.mask_paths(seq)):
            Image.fromarray(mask, mode="L").save(out / seq / path.name)


def test_score_of_ground_truth_is_perfect(tiny, tmp_path):
    copy_ground_truth(DAVIS(tiny["davis"]), tmp_path / "results")
    report = main(
        [
            "score",
            "--davis-root",
            str(tiny["davis"]),
            "--results",
            str(tmp_path / "results"),
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert set(KEYS) <= set(report["summary"])
    assert report["summary"]["J-Mean"] == 1.0 and report["summary"]["F-Mean"] == 1.0
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["J&F-Mean"] == 1.0


def test_score_refuses_missing_frames_and_extra_objects(tiny, tmp_path):
    dataset = DAVIS(tiny["davis"])
    results = tmp_path / "results"
    copy_ground_truth(dataset, results)
    seq = dataset.sequences[0]
    victim = dataset.mask_paths(seq)[2]
    (results / seq / victim.name).unlink()
    with pytest.raises(Exception, match=victim.stem):
        score_davis(tiny["davis"], results, "val")
    mask = np.asarray(Image.open(dataset.mask_paths(seq)[2])).copy()
    mask[:2, :2] = dataset.num_objects(seq) + 1  # an id the ground truth does not have
    Image.fromarray(mask, mode="L").save(results / seq / victim.name)
    with pytest.raises(ValueError, match=seq):
        score_davis(tiny["davis"], results, "val")


def test_davis_writes_results_layout_and_caches_features(tiny, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [
        "davis",
        "--davis-root",
        str(tiny["davis"]),
        "--checkpoint",
        "random",
        "--out",
        str(out),
        "--feature-cache",
        str(cache),
        "--device",
        "cpu",
        "--overlays",
        "propagation.context=3",
    ]
    first = main(argv)
    dataset = DAVIS(tiny["davis"])
    for seq in dataset.sequences:
        written = sorted(p.name for p in (out / seq).glob("*.png"))
        assert written == [p.name for p in dataset.mask_paths(seq)]
        image = Image.open(out / seq / written[1])
        assert image.mode == "P" and image.size == Image.open(dataset.frame_paths(seq)[1]).size
        assert (out / "overlays" / seq / "overlay.gif").is_file()
    assert first["network_calls"] > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"] == pytest.approx(first["summary"])
    assert {row["sequence"] for row in saved["rows"]} == set(dataset.sequences)

    # `score` on what `davis` wrote reproduces its numbers: one metric implementation, one layout.
    rescored, _ = score_davis(tiny["davis"], out, "val")
    assert rescored == pytest.approx(first["summary"])

    # A propagation-only rerun reads cached features and never calls the network.
    second = main(argv[:-1] + ["propagation.context=3", "propagation.topk=5"])
    assert second["network_calls"] == 0


def test_oracle_features_recover_real_masks(davis_real_root):
    """Real DAVIS frames and masks through propagation, upsampling and the metric: features that are
    the true masks themselves (pooled to the stride-8 grid) must track the dog almost perfectly,
    far above copying the first mask. Catches misaligned grids, label mix-ups and resizing bugs."""
    from stt.config import Config
    from stt.evaluate import propagate_video
    from stt.metrics import evaluate_davis_sequence, summarize_davis
    from stt.propagation import downsample_labels

    gt = DAVIS(davis_real_root).read_masks("dog")  # 60 x 480 x 854, one object
    grid = (60, 107)
    features = torch.stack([downsample_labels(torch.from_numpy(m.astype(np.int64)), 2, grid) for m in gt])
    cfg = Config()
    cfg.propagation.context = 3
    cfg.propagation.radius = 12.0  # DAVIS at stride 8 (evaluate_davis fills it in from the feature stride)
    pred = propagate_video(features, gt[0], 2, gt.shape[1:], cfg, "windowed")
    oracle = summarize_davis(evaluate_davis_sequence(gt, pred, "dog"))["J-Mean"]
    copied = summarize_davis(evaluate_davis_sequence(gt, np.repeat(gt[:1], len(gt), axis=0), "dog"))["J-Mean"]
    assert oracle > 0.95 and copied < 0.4


def test_vip_and_jhmdb_run_end_to_end(tmp_path):
    data = generate(tmp_path / "data", preset="tiny", kinds=("vip", "jhmdb"))
    common = ["--checkpoint", "lab:8", "--feature-cache", str(tmp_path / "cache"), "--device", "cpu"]
    vip = main(["vip", "--vip-root", str(data["vip"]), "--out", str(tmp_path / "vip"), *common])
    assert 0.0 < vip["mIoU"] <= 1.0 and len(vip["per_class_iou"]) == 20
    assert json.loads((tmp_path / "vip" / "metrics.json").read_text())["mIoU"] == pytest.approx(vip["mIoU"])
    jhmdb = main(["jhmdb", "--jhmdb-root", str(data["jhmdb"]), "--out", str(tmp_path / "jhmdb"), *common])
    assert 0.0 <= jhmdb["PCK@0.1"] <= jhmdb["PCK@0.2"] <= 100.0


def test_joint_heatmaps_round_trip_within_one_stride():
    """Keypoints -> Gaussian maps on a stride-8 grid -> upsampled peaks: back within one cell."""
    from stt.evaluate import heatmaps_to_joints, joints_to_heatmaps

    joints = np.array([[12.0, 20.0], [100.5, 7.0], [230.0, 150.0]])  # (x, y) pixels in a 160 x 240 image
    maps = joints_to_heatmaps(joints, (160, 240), (20, 30), sigma=0.5)
    assert maps.shape == (3, 20, 30)
    recovered = heatmaps_to_joints(maps[None], (160, 240))[0]
    assert np.abs(recovered - joints).max() <= 8


def test_jhmdb_on_the_real_clip_with_the_authors_settings(jhmdb_real_root, tmp_path):
    """Issue 17: JHMDB end to end on a real clip (official layout, 1-based `pos_img` joints): frames at
    320 x 320 and radius 5 cells at stride 8 (the authors' neighbor_range 10), and propagated joints
    beat copying the first frame's joints by far on a clip whose person moves (a catch)."""
    from stt.data.layouts import JHMDB
    from stt.metrics import pck

    report = main(
        [
            "jhmdb",
            "--jhmdb-root",
            str(jhmdb_real_root),
            "--out",
            str(tmp_path / "out"),
            "--checkpoint",
            "lab:8",
            "--feature-cache",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
    )
    assert report["config"]["eval"]["jhmdb_size"] == 320 and report["config"]["propagation"]["radius"] == 5
    dataset = JHMDB(jhmdb_real_root)
    ((action, video),) = dataset.videos
    joints = dataset.joints(action, video)
    assert joints.shape == (40, 15, 2) and len(dataset.frame_paths(action, video)) == 40
    copied = pck(np.repeat(joints[:1], len(joints), axis=0), joints)
    assert copied["PCK@0.2"] < 5  # the person moves: copying frame 1 finds almost nothing
    assert report["PCK@0.1"] <= report["PCK@0.2"] and report["PCK@0.2"] > copied["PCK@0.2"] + 15
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["PCK@0.2"] == pytest.approx(report["PCK@0.2"])


def test_a_checkpoints_stored_trunk_wins_over_the_config_and_says_so(tmp_path, capsys):
    """Issue 15: the stored model config used to override the given one silently."""
    from stt import checkpoint
    from stt.config import Config, EvalConfig, ModelConfig
    from stt.features import FeatureExtractor
    from stt.models import build_encoder

    trained = Config()
    trained.model.stride, trained.model.input_space = 4, "lab"
    path = tmp_path / "temporal-final.pt"
    encoder = build_encoder(trained.model)
    optimizer = torch.optim.Adam(encoder.parameters())
    torch.save(checkpoint.payload(encoder.state_dict(), trained, "temporal", 1, optimizer), path)

    extractor = FeatureExtractor(str(path), ModelConfig(), EvalConfig())
    assert (extractor.model_cfg.stride, extractor.input_space) == (4, "lab")
    assert capsys.readouterr().out == (
        f"stt: {path}: its stored model config wins, as its weights were trained with it: "
        "model.stride=4 (the config says 8)\n"
    )
    FeatureExtractor(str(path), trained.model, EvalConfig())
    assert capsys.readouterr().out == ""


def test_feature_cache_miss_and_hit_return_the_same_tensor(tmp_path):
    """The first (extracting) run and a cached rerun must propagate identical inputs: the same fp16-rounded
    values and the same contiguous layout (a channels-last network output changes a matmul's summation order)."""
    from stt.features import FeatureCache

    frames = [tmp_path / f"{i:05d}.jpg" for i in range(3)]
    for path in frames:
        path.write_bytes(b"frame")
    output = torch.randn(3, 8, 4, 5).to(memory_format=torch.channels_last)
    cache = FeatureCache(tmp_path / "cache")
    miss = cache.load_or_compute(_Fake(output), frames, lambda: None)
    hit = cache.load_or_compute(_Fake(None), frames, lambda: None)
    assert miss.is_contiguous() and hit.is_contiguous()
    assert torch.equal(miss, hit) and torch.equal(miss, output.half().float())


class _Fake:
    """A feature extractor returning fixed features (None: must not be called)."""

    cache_key, device = "test", torch.device("cpu")

    def __init__(self, output):
        self.output = output

    def __call__(self, frames):
        assert self.output is not None, "a cache hit ran the extractor"
        return self.output
