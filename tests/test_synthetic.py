"""The synthetic datasets: exact official layouts, byte-for-byte determinism, the embedded-default cache,
and the geometry and numerics they are built from, checked against hand-computed values."""

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from stt.data import layouts, synthetic
from stt.data.synthetic import PRESETS, cache
from stt.data.synthetic.layers import draw_sprite
from stt.data.synthetic.numerics import to_uint8, video_rng
from stt.data.synthetic.puppet import DEFAULT_ANGLES
from stt.data.synthetic.writers import write_mat

# sha256 over the sorted relative paths and bytes of `generate(dir, "tiny", seed=0)`. It changes only
# when the generator's output does: then bump GENERATOR_VERSION (the cache key) and record the new one.
TINY_SEED0_SHA256 = "73559287e9e00769b9ac3aee435e61dcbdbdeda9cd6a092fe01036b93ad3a8c0"


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def copy_first_mask_j(davis_root: Path, split: str = "val") -> float:
    """Mean J of predicting every frame with the first mask: per object of frame 0, the mean IoU over
    frames 1..T-2 (the DAVIS evaluator drops the first and last), IoU of two empty masks = 1."""
    per_object = []
    for seq in (davis_root / "ImageSets" / "2017" / f"{split}.txt").read_text().split():
        paths = sorted((davis_root / "Annotations" / "480p" / seq).glob("*.png"))
        masks = [np.asarray(Image.open(path)) for path in paths]
        for k in range(1, int(masks[0].max()) + 1):
            first = masks[0] == k
            ious = []
            for mask in masks[1:-1]:
                union = np.sum(first | (mask == k))
                ious.append(1.0 if union == 0 else np.sum(first & (mask == k)) / union)
            per_object.append(np.mean(ious))
    return float(np.mean(per_object))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return synthetic.generate(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


# ---------------------------------------------------------------------------------------------- layouts


def test_davis_layout(tiny):
    root, preset = tiny["davis"], PRESETS["tiny"]
    late_objects = 0
    widths = set()
    for split, count in (("val", preset.davis_val), ("train", preset.davis_train)):
        names = (root / "ImageSets" / "2017" / f"{split}.txt").read_text().splitlines()
        assert len(names) == count
        for name in names:
            frames = sorted((root / "JPEGImages" / "480p" / name).iterdir())
            masks = sorted((root / "Annotations" / "480p" / name).iterdir())
            stems = [f"{t:05d}" for t in range(preset.davis_frames)]
            assert [p.name for p in frames] == [f"{s}.jpg" for s in stems]
            assert [p.name for p in masks] == [f"{s}.png" for s in stems]  # every frame annotated
            ids_seen = set()
            for frame_path, mask_path in zip(frames, masks):
                frame, mask = Image.open(frame_path), Image.open(mask_path)
                assert frame.format == "JPEG" and frame.mode == "RGB"
                assert mask.mode == "P" and mask.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
                assert mask.size == frame.size and frame.size[1] == preset.davis_height
                ids_seen |= set(np.unique(np.asarray(mask)).tolist()) - {0}
                widths.add(frame.size[0])
            first = np.unique(np.asarray(Image.open(masks[0])))
            k = int(first.max())
            assert k >= 1 and first.tolist() == list(range(k + 1))  # frame 0 holds exactly ids 1..k
            assert 1 <= len(ids_seen) <= 3 and ids_seen == set(range(1, len(ids_seen) + 1))
            late_objects += len(ids_seen) - k
    assert late_objects >= 1, "some object must appear only after frame 0"
    assert any(width % 2 for width in widths) and len(widths) > 1


def test_ytvos_layout(tiny):
    train, preset = tiny["ytvos"] / "train", PRESETS["tiny"]
    meta = json.loads((train / "meta.json").read_text())
    videos = sorted(p.name for p in (train / "JPEGImages").iterdir())
    assert sorted(meta["videos"]) == videos and len(videos) == preset.ytvos_videos
    starts = []
    for video in videos:
        stems = [p.stem for p in sorted((train / "JPEGImages" / video).iterdir())]
        numbers = [int(s) for s in stems]
        assert len(stems) == preset.ytvos_frames and all(len(s) == 5 for s in stems)
        assert numbers == list(range(numbers[0], numbers[0] + 5 * len(numbers), 5)) and numbers[0] % 5 == 0
        starts.append(numbers[0])
        present = {}
        for stem in stems:
            mask = Image.open(train / "Annotations" / video / f"{stem}.png")
            assert mask.mode == "P" and mask.size == Image.open(train / "JPEGImages" / video / f"{stem}.jpg").size
            for object_id in np.unique(np.asarray(mask))[1:]:
                present.setdefault(str(object_id), []).append(stem)
        objects = meta["videos"][video]["objects"]
        assert {k: v["frames"] for k, v in objects.items()} == present and present
        assert all(isinstance(v["category"], str) and v["category"] for v in objects.values())
    assert any(start != 0 for start in starts)


def test_jhmdb_layout(tiny):
    root, preset = tiny["jhmdb"], PRESETS["tiny"]
    for action in synthetic.JHMDB_ACTIONS:
        lines = (root / "splits" / f"{action}_test_split1.txt").read_text().splitlines()
        assert [line.split()[1] for line in lines] == ["1", "2"]  # tiny: one train, one test video
        for line in lines:
            video = line.split()[0]
            assert video.endswith(".avi")
            video = video[: -len(".avi")]
            frames = sorted((root / "Rename_Images" / action / video).iterdir())
            assert [p.name for p in frames] == [f"{t:05d}.png" for t in range(1, preset.jhmdb_frames + 1)]
            height, width = preset.jhmdb_size
            assert Image.open(frames[0]).size == (width, height)
            pos_img = scipy.io.loadmat(root / "joint_positions" / action / video / "joint_positions.mat")["pos_img"]
            assert pos_img.shape == (2, 15, preset.jhmdb_frames)
            # MATLAB 1-based: the body (neck, belly) sits inside [1, size]
            assert np.all(pos_img[:, :2] >= 1) and np.all(pos_img[0, :2] <= width) and np.all(pos_img[1, :2] <= height)


def test_jhmdb_joints_are_the_rendered_puppet_plus_one(tiny):
    preset = PRESETS["tiny"]
    textures = synthetic.load_textures()
    scene = synthetic.random_puppet_scene(
        video_rng(0, "jhmdb", 0), preset, preset.jhmdb_size, preset.jhmdb_frames, 1, textures, "clap"
    )
    pos_img = scipy.io.loadmat(
        tiny["jhmdb"] / "joint_positions" / "clap" / "synthetic_clap_00" / "joint_positions.mat"
    )["pos_img"]
    for t in range(scene.frames):
        expected = synthetic.puppet_joints(scene.puppets[0], t)
        for j, name in enumerate(synthetic.JHMDB_JOINTS):
            np.testing.assert_array_equal(pos_img[:, j, t], expected[name] + 1.0)


def test_vip_layout(tiny):
    fine, preset = tiny["vip"] / "VIP_Fine", PRESETS["tiny"]
    val = (fine / "lists" / "val_videos.txt").read_text().splitlines()
    train = (fine / "lists" / "train_videos.txt").read_text().splitlines()
    assert val == ["videos1"] and train == ["videos2"]
    for video in val + train:
        frames = sorted((fine / "Images" / video).iterdir())
        assert [p.name for p in frames] == [f"{t:012d}.jpg" for t in range(1, preset.vip_frames + 1)]
        labels = sorted((fine / "Annotations" / "Category_ids" / video).iterdir())
        assert [p.name for p in labels] == [f"{t:012d}.png" for t in range(1, preset.vip_frames + 1, 25)]
        assert len(labels) == 2
        for path in labels:
            label = Image.open(path)
            assert label.mode == "L" and label.size == Image.open(fine / "Images" / video / f"{path.stem}.jpg").size
            classes = set(np.unique(np.asarray(label)).tolist())
            assert {0, 5, 13}.issubset(classes) and classes <= set(range(20))


def test_readers_in_stt_data_layouts_accept_the_tiny_trees(tiny):
    davis = layouts.DAVIS(tiny["davis"], "val")
    assert davis.sequences == ["val-00", "val-01"]
    for seq in davis.sequences:
        frames, masks = davis.read_frames(seq), davis.read_masks(seq)
        assert frames.shape[:3] == masks.shape and davis.num_objects(seq) == masks[0].max()
        assert davis.palette(seq) == layouts.davis_palette()
    ytvos = layouts.YouTubeVOS(tiny["ytvos"])
    assert len(ytvos.videos) == PRESETS["tiny"].ytvos_videos
    for video in ytvos.videos:
        numbers = ytvos.frame_numbers(video)
        assert np.all(np.diff(numbers) == 5)
    jhmdb = layouts.JHMDB(tiny["jhmdb"], split=1, subset="test")
    assert len(jhmdb.videos) == len(synthetic.JHMDB_ACTIONS)
    for action, video in jhmdb.videos:
        joints = jhmdb.joints(action, video)
        assert joints.shape == (len(jhmdb.frame_paths(action, video)), 15, 2)
    vip = layouts.VIP(tiny["vip"], "val")
    pairs = vip.label_paths("videos1")
    assert sorted(pairs) == [0, 25]
    assert vip.read_label(pairs[25]).shape == (PRESETS["tiny"].vip_size[0], PRESETS["tiny"].vip_size[1])


# ---------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_recorded_digest(tiny, tmp_path):
    again = synthetic.generate(tmp_path, "tiny", seed=0)
    first_root = tiny["davis"].parent
    assert tree_digest(tmp_path) == tree_digest(first_root)
    assert set(again) == set(synthetic.KINDS)
    assert tree_digest(first_root) == TINY_SEED0_SHA256


def test_different_seeds_differ(tiny, tmp_path):
    other = synthetic.generate(tmp_path, "tiny", seed=1, kinds=("davis",))
    assert tree_digest(other["davis"]) != tree_digest(tiny["davis"])


def test_videos_do_not_depend_on_generation_order(tiny, tmp_path):
    alone = synthetic.generate(tmp_path, "tiny", seed=0, kinds=("vip",))
    assert tree_digest(alone["vip"]) == tree_digest(tiny["vip"])


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="preset 'huge'"):
        synthetic.generate(tmp_path, "huge")
    with pytest.raises(ValueError, match="kind"):
        synthetic.generate(tmp_path, "tiny", kinds=("kitti",))
    with pytest.raises(ValueError, match="seed"):
        synthetic.generate(tmp_path, "tiny", seed=-1)


# ------------------------------------------------------------------------------------------- the cache


def test_ensure_dataset_generates_once_then_reuses(tmp_path, monkeypatch, capsys):
    calls = []
    real_generate = synthetic.generate

    def counting_generate(out_dir, preset="default", seed=0, kinds=synthetic.KINDS):
        calls.append(Path(out_dir))
        return real_generate(out_dir, "tiny", seed, ("davis",))  # small stand-in for the full set

    monkeypatch.setattr(cache, "generate", counting_generate)
    monkeypatch.setenv("STT_CACHE", str(tmp_path))
    root = synthetic.ensure_dataset("davis", "tiny", seed=3)
    expected = tmp_path / f"synthetic-tiny-s3-v{synthetic.GENERATOR_VERSION}" / "davis"
    assert root == expected and (root / "ImageSets" / "2017" / "val.txt").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith("stt: no dataset given") and str(expected.parent) in printed[0]
    assert synthetic.ensure_dataset("davis", "tiny", seed=3) == expected
    assert synthetic.ensure_dataset("ytvos", "tiny", seed=3) == expected.parent / "youtube-vos"
    assert len(calls) == 1 and capsys.readouterr().out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [expected.parent.name]  # no temporary folder left


def test_ensure_dataset_survives_losing_a_race(tmp_path, monkeypatch):
    final = tmp_path / f"synthetic-tiny-s0-v{synthetic.GENERATOR_VERSION}"

    def generate_while_another_process_finishes(out_dir, preset="default", seed=0, kinds=synthetic.KINDS):
        (Path(out_dir) / "mine").mkdir()
        (final / "davis").mkdir(parents=True)  # the winner's complete copy lands first
        return {}

    monkeypatch.setattr(cache, "generate", generate_while_another_process_finishes)
    assert synthetic.ensure_dataset("davis", "tiny", cache_dir=tmp_path) == final / "davis"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name] and not (final / "mine").exists()


def test_ensure_dataset_removes_a_killed_generations_scratch_and_follows_the_umask(tmp_path, monkeypatch):
    """Issue 18: a killed generation left a 32-57 MB hidden folder behind for ever, and the cache was
    created 0700, unreadable to a team sharing it."""
    import os
    import stat
    import time

    name = f"synthetic-tiny-s0-v{synthetic.GENERATOR_VERSION}"
    killed, running = tmp_path / f".{name}-killed", tmp_path / f".{name}-running"
    for folder in (killed, running):
        (folder / "davis").mkdir(parents=True)
        (folder / "davis" / "frame.jpg").write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (killed, killed / "davis", killed / "davis" / "frame.jpg"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    monkeypatch.setattr(cache, "generate", lambda out_dir, *args, **kwargs: (Path(out_dir) / "davis").mkdir())
    old_mask = os.umask(0o022)
    try:
        root = synthetic.ensure_dataset("davis", "tiny", cache_dir=tmp_path)
    finally:
        os.umask(old_mask)
    assert not killed.exists() and running.is_dir()  # another process's generation still writing is left alone
    assert stat.S_IMODE(root.parent.stat().st_mode) == 0o755


def test_command_line(tmp_path, capsys):
    synthetic.main(["--preset", "tiny", "--seed", "0", "--out", str(tmp_path), "--kinds", "jhmdb"])
    assert [p.name for p in tmp_path.iterdir()] == ["jhmdb"]
    assert "jhmdb:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--kinds", "davis,nope"])


# --------------------------------------------------------------------- numerics, by hand-computed values


def test_bilinear_matches_hand_values_and_clamps():
    image = np.array([[0.0, 10.0, 20.0], [30.0, 40.0, 50.0]])[..., None]  # 2 x 3 x 1
    x = np.array([0.5, 1.5, -1.0, 2.0, 0.25])
    y = np.array([0.0, 0.5, 5.0, 1.0, 0.5])
    # (0.5, 0): 5; (1.5, 0.5): mean of 10, 20, 40, 50; (-1, 5) clamps to (0, 1); (2, 1) the corner;
    # (0.25, 0.5): 0.5 * (2.5 + 32.5)
    np.testing.assert_allclose(synthetic.bilinear(image, x, y)[:, 0], [5.0, 30.0, 30.0, 50.0, 17.5])
    rng = np.random.default_rng(0)
    photo = rng.uniform(0.0, 255.0, size=(20, 30, 3))
    columns, rows = np.linspace(-2.0, 33.0, 17), np.linspace(0.3, 19.0, 11)
    grid_x, grid_y = np.meshgrid(columns, rows)
    np.testing.assert_allclose(
        synthetic.bilinear_grid(photo, columns, rows), synthetic.bilinear(photo, grid_x, grid_y), rtol=0, atol=1e-9
    )


def test_to_uint8_rounds_half_up_and_clips():
    values = np.array([-3.0, 0.49, 0.5, 1.5, 254.5, 300.0])
    assert to_uint8(values).tolist() == [0, 0, 1, 2, 255, 255]


def test_davis_palette_is_the_voc_colour_map():
    palette = np.array(layouts.davis_palette()).reshape(256, 3)
    assert palette[:8].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
        [128, 0, 128],
        [0, 128, 128],
        [128, 128, 128],
    ]
    assert palette[255].tolist() == [224, 224, 192]  # the void colour of DAVIS and VOC


def test_relabel_by_appearance():
    first = np.array([[0, 3], [0, 0]], dtype=np.uint8)
    second = np.array([[2, 3], [5, 0]], dtype=np.uint8)
    masks, old_ids = synthetic.relabel_by_appearance([first, second])
    assert old_ids == [3, 2, 5]
    assert masks[0].tolist() == [[0, 1], [0, 0]] and masks[1].tolist() == [[2, 1], [3, 0]]


def test_circle_sprite_labels_exactly_the_pixels_within_its_radius():
    sprite = synthetic.Sprite(
        ellipses=((0.0, 0.0, 1.0, 1.0),),
        extent=1.0,
        texture="flat",
        tint=(1.0, 1.0, 1.0),
        texture_centre=(5.0, 5.0),
        texture_scale=2.0,
        label=7,
        radius=6.0,
        centre=(10.3, 8.6),
        amplitude=(0.0, 0.0),
        frequency=(0.0, 0.0),
        phase=(0.0, 0.0),
        angle=0.4,
        spin=0.0,
        scale_wave=(0.0, 0.0, 0.0),
        bend_wave=(0.0, 0.0, 0.0),
        ripple_wave=(0.0, 0.0, 0.0),
    )
    canvas, labels = np.zeros((20, 24, 3)), np.zeros((20, 24), dtype=np.uint8)
    draw_sprite(canvas, labels, sprite, 0, {"flat": np.full((11, 11, 3), 200.0)})
    rows, columns = np.mgrid[0:20, 0:24]
    inside = (columns - 10.3) ** 2 + (rows - 8.6) ** 2 <= 36.0
    np.testing.assert_array_equal(labels == 7, inside)
    # coverage: 0.5 + the distance to the outline, which 1 - r^2 / R^2 times R / 2 approximates
    squared = ((columns - 10.3) ** 2 + (rows - 8.6) ** 2) / 36.0
    coverage = np.clip(0.5 + (1.0 - squared) * 3.0, 0.0, 1.0)
    np.testing.assert_allclose(canvas[..., 1], 200.0 * coverage, rtol=0, atol=1e-6)  # cos, sin rounded to 1e-9
    assert coverage[inside].min() >= 0.5 and np.sum((coverage > 0) & (coverage < 1)) > 0


def test_puppet_kinematics_by_hand():
    rest = {name: (0.0, 0.0, 0.0, 0.0) for name in DEFAULT_ANGLES}
    rest["shoulder_l"] = (math.pi / 2, 0.0, 0.0, 0.0)  # left upper arm straight out to the image right
    puppet = synthetic.Puppet(
        size=10.0, centre=(50.0, 60.0), path=((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), waves=rest, looks={}
    )
    joints = {name: point.tolist() for name, point in synthetic.puppet_joints(puppet, 3).items()}
    assert joints["belly"] == [50.0, 60.0] and joints["neck"] == [50.0, 50.0] and joints["face"] == [50.0, 45.5]
    np.testing.assert_allclose(joints["right_shoulder"], [46.2, 50.8])  # person's right is image left
    np.testing.assert_allclose(joints["right_elbow"], [46.2, 55.8])  # hanging: 5 px straight down
    np.testing.assert_allclose(joints["right_wrist"], [46.2, 60.3])
    np.testing.assert_allclose(joints["left_elbow"], [58.8, 50.8])  # 90 degrees away from the body
    np.testing.assert_allclose(joints["left_wrist"], [63.3, 50.8])
    np.testing.assert_allclose(joints["right_hip"], [48.0, 62.5])
    np.testing.assert_allclose(joints["right_knee"], [48.0, 68.5])
    np.testing.assert_allclose(joints["right_ankle"], [48.0, 74.0])


def test_mat_file_header_has_no_timestamp(tmp_path):
    pos_img = np.arange(2 * 15 * 3, dtype=np.float64).reshape(2, 15, 3)
    write_mat(tmp_path / "a.mat", {"pos_img": pos_img})
    data = (tmp_path / "a.mat").read_bytes()
    assert data.startswith(b"MATLAB 5.0 MAT-file, written by stt.data.synthetic ")
    np.testing.assert_array_equal(scipy.io.loadmat(tmp_path / "a.mat")["pos_img"], pos_img)


@pytest.mark.slow
def test_default_preset_difficulty(tmp_path):
    """Copying the first mask scores mean J ~0.3 on the default DAVIS val set (hard: ~0.12)."""
    preset = dataclasses.replace(PRESETS["default"], davis_train=0)  # val videos do not depend on train
    synthetic.write_davis(tmp_path, preset, 0, synthetic.load_textures())
    assert 0.25 <= copy_first_mask_j(tmp_path) <= 0.35
