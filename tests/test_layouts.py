"""Dataset readers on small hand-built trees in the official layouts, broken trees, and real DAVIS."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageFile

from stt.data.layouts import (
    DAVIS,
    JHMDB,
    VIP,
    DatasetError,
    ImageFolder,
    YouTubeVOS,
    davis_palette,
    read_mask,
    read_palette,
    read_rgb,
    read_rgb_or_none,
)

# --------------------------------------------------------------------------- builders


def write_image(path: Path, height: int = 6, width: int = 8, value: int = 0) -> Path:
    """A flat-colour image; PIL picks the format (JPEG, PNG, BMP, WebP) from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, 100, 200)).save(path, quality=95)
    return path


def write_mask(path: Path, ids: np.ndarray, mode: str = "P") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode="L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette(davis_palette())
    elif mode == "RGB":
        img = img.convert("RGB")
    img.save(path)
    return path


def write_clutter(folder: Path) -> None:
    """What macOS zips leave behind; none of it is a readable image."""
    (folder / "__MACOSX").mkdir(parents=True, exist_ok=True)
    (folder / ".AppleDouble").mkdir(exist_ok=True)
    (folder / "__MACOSX" / "00000.jpg").write_bytes(b"resource fork")
    (folder / ".AppleDouble" / "00000.jpg").write_bytes(b"resource fork")
    (folder / "._00000.jpg").write_bytes(b"resource fork")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_davis(root: Path, sequences: dict, split: str = "val", resolution: str = "480p") -> Path:
    """sequences: name -> (frames, height, width); masks hold id 1 in the top-left pixel block."""
    for seq, (frames, height, width) in sequences.items():
        for t in range(frames):
            write_image(root / "JPEGImages" / resolution / seq / f"{t:05d}.jpg", height, width, value=10 * t)
            ids = np.zeros((height, width), np.uint8)
            ids[:2, :2] = 1
            write_mask(root / "Annotations" / resolution / seq / f"{t:05d}.png", ids)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("\n".join(sequences) + "\n")
    return root


# --------------------------------------------------------------------------- image files


def test_read_rgb_returns_exact_pixels_of_a_png(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, pixels)


def test_read_rgb_converts_grey_jpeg_to_three_channels(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.jpg")
    out = read_rgb(tmp_path / "g.jpg")
    assert out.shape == (4, 5, 3)
    assert np.abs(out.astype(int) - 77).max() <= 1


@pytest.mark.parametrize("damage", ["missing", "not_an_image", "truncated"])
def test_read_rgb_refuses_bad_files_naming_them(tmp_path, damage):
    path = write_image(tmp_path / "frame.jpg", 64, 64)
    if damage == "missing":
        path.unlink()
    elif damage == "not_an_image":
        path.write_text("hello")
    else:
        truncate(path)
    with pytest.raises(DatasetError, match="frame.jpg"):
        read_rgb(path)
    assert read_rgb_or_none(path) is None


def test_truncated_jpeg_raises_with_pil_defaults_and_guard_refuses_the_flag(tmp_path, monkeypatch):
    path = write_image(tmp_path / "frame.jpg", 64, 64)
    truncate(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DatasetError, match="truncated"):
        read_rgb(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        read_rgb(path)


@pytest.mark.parametrize("mode", ["P", "L"])
def test_read_mask_returns_indices_of_palette_and_grey_pngs(tmp_path, mode):
    ids = np.array([[0, 1, 2], [255, 3, 0]], np.uint8)
    out = read_mask(write_mask(tmp_path / "m.png", ids, mode))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, ids)


def test_read_mask_refuses_rgb_png(tmp_path):
    path = write_mask(tmp_path / "m.png", np.zeros((2, 2)), "RGB")
    with pytest.raises(DatasetError, match=r"m\.png.*'RGB'"):
        read_mask(path)


def test_read_palette_pads_to_768_and_is_none_for_grey(tmp_path):
    img = Image.fromarray(np.array([[0, 1]], np.uint8), mode="L").convert("P")
    img.putpalette([1, 2, 3, 4, 5, 6])  # two entries only
    img.save(tmp_path / "p.png")
    palette = read_palette(tmp_path / "p.png")
    assert len(palette) == 768
    assert palette[:6] == [1, 2, 3, 4, 5, 6] and set(palette[6:]) == {0}
    assert read_palette(write_mask(tmp_path / "l.png", np.zeros((2, 2)), "L")) is None


def test_davis_palette_matches_hand_computed_pascal_colours():
    palette = davis_palette()
    colour = {i: tuple(palette[3 * i : 3 * i + 3]) for i in range(256)}
    assert len(palette) == 768
    assert colour[0] == (0, 0, 0)
    assert colour[1] == (128, 0, 0)
    assert colour[2] == (0, 128, 0)
    assert colour[3] == (128, 128, 0)
    assert colour[4] == (0, 0, 128)
    assert colour[8] == (64, 0, 0)  # bit 3 is r's second-highest bit
    assert colour[255] == (224, 224, 192)  # void: r, g get three bits each, b two


# --------------------------------------------------------------------------- DAVIS


def test_davis_reads_a_good_tree(tmp_path):
    # File order, not alphabetical; sequences of different widths.
    root = make_davis(tmp_path, {"zebra": (3, 6, 8), "apple": (2, 4, 10)})
    ids = np.zeros((6, 8), np.uint8)
    ids[0, :3] = [3, 255, 1]
    write_mask(root / "Annotations/480p/zebra/00000.png", ids)
    davis = DAVIS(root)
    assert davis.sequences == ["zebra", "apple"]
    assert [p.name for p in davis.frame_paths("zebra")] == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert [p.name for p in davis.mask_paths("zebra")] == ["00000.png", "00001.png", "00002.png"]
    frames = davis.read_frames("zebra")
    assert frames.shape == (3, 6, 8, 3) and frames.dtype == np.uint8
    assert abs(int(frames[2, 0, 0, 0]) - 20) <= 2  # frame t has red value 10 t
    masks = davis.read_masks("zebra")
    assert masks.shape == (3, 6, 8) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[0], ids)
    np.testing.assert_array_equal(davis.first_mask("zebra"), ids)
    assert davis.num_objects("zebra") == 3  # 255 is void, not object 255
    assert davis.num_objects("apple") == 1
    assert davis.read_frames("apple").shape == (2, 4, 10, 3)
    assert davis.palette("zebra") == davis_palette()


def test_davis_palette_falls_back_for_grey_masks(tmp_path):
    root = make_davis(tmp_path, {"a": (1, 4, 4)})
    write_mask(root / "Annotations/480p/a/00000.png", np.ones((4, 4)), "L")
    assert DAVIS(root).palette("a") == davis_palette()


def test_davis_full_resolution_and_test_dev_with_first_mask_only(tmp_path):
    root = make_davis(tmp_path, {"a": (3, 4, 6)}, split="test-dev", resolution="Full-Resolution")
    for t in (1, 2):
        (root / f"Annotations/Full-Resolution/a/{t:05d}.png").unlink()
    davis = DAVIS(root, split="test-dev", resolution="Full-Resolution")
    assert len(davis.frame_paths("a")) == 3
    assert davis.read_masks("a").shape == (1, 4, 6)
    assert davis.num_objects("a") == 1


def _break(root: Path, damage: str) -> str:
    """Damage a good two-sequence DAVIS tree; return what the error message must name."""
    seq = root / "JPEGImages/480p/b"
    if damage == "split file":
        (root / "ImageSets/2017/val.txt").unlink()
        return "val.txt"
    if damage == "frame folder":
        (root / "JPEGImages/480p").rename(root / "JPEGImages/720p")
        return "JPEGImages/480p"
    if damage == "listed sequence":
        with open(root / "ImageSets/2017/val.txt", "a") as f:
            f.write("ghost\n")
        return "ghost"
    if damage == "empty sequence":
        for path in seq.iterdir():
            path.unlink()
        return "JPEGImages/480p/b"
    if damage == "mask count":
        (root / "Annotations/480p/b/00002.png").unlink()
        return "2 masks for 3 frames"
    if damage == "mask size":
        write_mask(root / "Annotations/480p/b/00001.png", np.zeros((5, 8)))
        return "b/00001.png"
    if damage == "mask mode":
        write_mask(root / "Annotations/480p/b/00001.png", np.zeros((6, 8)), "RGB")
        return "b/00001.png"
    if damage == "truncated frame":
        write_image(seq / "00001.jpg", 200, 200)
        truncate(seq / "00001.jpg")
        return "b/00001.jpg"
    if damage == "frame size":
        write_image(seq / "00002.jpg", 6, 9)
        return "b/00002.jpg"
    if damage == "mask name":
        (root / "Annotations/480p/b/00002.png").rename(root / "Annotations/480p/b/00007.png")
        return "00007.png"
    if damage == "listed twice":  # issue 18: it was scored twice, weighing twice in the mean
        with open(root / "ImageSets/2017/val.txt", "a") as f:
            f.write("a\n")
        return "val.txt: lists a more than once"
    if damage == "no object in first mask":  # issue 18: 0/255 masks made the sequence leave the mean silently
        ids = np.zeros((6, 8), np.uint8)
        ids[:2, :2] = 255
        write_mask(root / "Annotations/480p/b/00000.png", ids)
        return "b/00000.png: the first annotation holds no object"
    raise AssertionError(damage)


@pytest.mark.parametrize(
    "damage",
    [
        "split file",
        "frame folder",
        "listed sequence",
        "empty sequence",
        "mask count",
        "mask size",
        "mask mode",
        "truncated frame",
        "frame size",
        "mask name",
        "listed twice",
        "no object in first mask",
    ],
)
def test_davis_refuses_broken_trees_naming_the_path(tmp_path, damage):
    root = make_davis(tmp_path, {"a": (2, 6, 8), "b": (3, 6, 8)})
    expected = _break(root, damage)

    def read_everything():
        davis = DAVIS(root)
        for seq in davis.sequences:
            davis.read_frames(seq)
            davis.read_masks(seq)

    with pytest.raises(DatasetError, match=expected):
        read_everything()


def test_davis_refuses_missing_root_and_unknown_resolution(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        DAVIS(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="'1080p'"):
        DAVIS(make_davis(tmp_path, {"a": (1, 4, 4)}), resolution="1080p")


# --------------------------------------------------------------------------- YouTube-VOS


def make_youtube(root: Path, folder: str = "train") -> Path:
    frames = root / folder / "JPEGImages"
    for name in ("00100", "00005", "00010"):
        write_image(frames / "vid_a" / f"{name}.jpg")
    for number in (35, 40, 45):
        write_image(frames / "vid_b" / f"{number:05d}.jpg")
    write_clutter(frames)
    write_clutter(frames / "vid_a")
    return root


def test_youtube_vos_orders_frames_numerically_and_skips_clutter(tmp_path):
    root = make_youtube(tmp_path)
    (tmp_path / "train" / "meta.json").write_text('{"videos": {"vid_a": {"objects": {}}}}')
    vos = YouTubeVOS(root)
    assert vos.videos == ["vid_a", "vid_b"]
    assert vos.frame_numbers("vid_a") == [5, 10, 100]
    assert [p.name for p in vos.frame_paths("vid_a")] == ["00005.jpg", "00010.jpg", "00100.jpg"]
    assert vos.frame_numbers("vid_b") == [35, 40, 45]
    assert vos.meta == {"videos": {"vid_a": {"objects": {}}}}


def test_frame_order_is_numeric_not_lexical_for_unpadded_names(tmp_path):
    for name in ("100", "9", "10", "0035"):
        write_image(tmp_path / "train/JPEGImages/v" / f"{name}.jpg")
    assert YouTubeVOS(tmp_path).frame_numbers("v") == [9, 10, 35, 100]


def test_youtube_vos_accepts_the_split_folder_and_all_frames(tmp_path):
    make_youtube(tmp_path, "train_all_frames")
    assert YouTubeVOS(tmp_path, all_frames=True).frame_numbers("vid_b") == [35, 40, 45]
    vos = YouTubeVOS(tmp_path / "train_all_frames")
    assert vos.videos == ["vid_a", "vid_b"] and vos.meta == {}


def test_youtube_vos_survives_a_corrupt_frame_and_refuses_a_missing_split(tmp_path):
    root = make_youtube(tmp_path)
    truncate(write_image(root / "train/JPEGImages/vid_b/00040.jpg", 64, 64))
    frames = [read_rgb_or_none(p) for p in YouTubeVOS(root).frame_paths("vid_b")]
    assert [f is None for f in frames] == [False, True, False]
    with pytest.raises(DatasetError, match="JPEGImages"):
        YouTubeVOS(root, all_frames=True)


# --------------------------------------------------------------------------- image folder


def test_image_folder_finds_images_recursively_any_case(tmp_path):
    for rel in ("n01/a.JPEG", "n01/b.jpg", "n02/deep/c.png", "d.bmp", "e.WebP"):
        write_image(tmp_path / rel)
    (tmp_path / "n01" / "labels.txt").write_text("not an image")
    (tmp_path / "n01" / ".hidden.jpg").write_bytes(b"x")
    write_clutter(tmp_path / "n02")
    paths = ImageFolder(tmp_path).paths
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "d.bmp",
        "e.WebP",
        "n01/a.JPEG",
        "n01/b.jpg",
        "n02/deep/c.png",
    ]


def test_image_folder_refuses_an_empty_or_missing_root(tmp_path):
    write_clutter(tmp_path)
    with pytest.raises(DatasetError, match="no images"):
        ImageFolder(tmp_path)
    with pytest.raises(DatasetError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")


# --------------------------------------------------------------------------- JHMDB


def make_jhmdb(root: Path) -> Path:
    videos = {"clap": ["v_clap_1", "v_clap_2"], "run": ["v_run_1"]}
    flags = {"v_clap_1": 2, "v_clap_2": 1, "v_run_1": 2}
    for action, names in videos.items():
        lines = [f"{name}.avi {flags[name]} " for name in names]  # the official files end lines in a space
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{action}_test_split1.txt").write_text("\n".join(lines) + "\n")
        (root / "splits" / f"{action}_test_split2.txt").write_text(f"{names[0]}.avi 1\n")
        for name in names:
            for t in (1, 2, 3):
                write_image(root / "Rename_Images" / action / name / f"{t:05d}.png", 4, 6)
            (root / "joint_positions" / action / name).mkdir(parents=True)
            pos_img = np.zeros((2, 15, 3))
            scipy.io.savemat(root / "joint_positions" / action / name / "joint_positions.mat", {"pos_img": pos_img})
    write_clutter(root / "splits")
    (root / "splits" / "._clap_test_split1.txt").write_bytes(b"\x00\x05\x16\x07")
    write_clutter(root / "Rename_Images")
    write_clutter(root / "joint_positions" / "clap")
    return root


def test_jhmdb_parses_split_files_ignoring_clutter(tmp_path):
    root = make_jhmdb(tmp_path)
    assert JHMDB(root).videos == [("clap", "v_clap_1"), ("run", "v_run_1")]
    assert JHMDB(root, subset="train").videos == [("clap", "v_clap_2")]
    assert JHMDB(root, split=2, subset="train").videos == [("clap", "v_clap_1"), ("run", "v_run_1")]
    jhmdb = JHMDB(root)
    assert [p.name for p in jhmdb.frame_paths("run", "v_run_1")] == ["00001.png", "00002.png", "00003.png"]
    assert jhmdb.read_frames("run", "v_run_1").shape == (3, 4, 6, 3)


def test_jhmdb_joints_convert_matlab_1_based_to_0_based(tmp_path):
    root = make_jhmdb(tmp_path)
    pos_img = np.zeros((2, 15, 3))
    pos_img[0, 4, 2] = 1.0  # x of joint 4 in frame 3 is MATLAB's first column: 0 here
    pos_img[1, 4, 2] = 10.5
    pos_img[0, 0, 0] = 7.25
    scipy.io.savemat(root / "joint_positions/clap/v_clap_1/joint_positions.mat", {"pos_img": pos_img})
    joints = JHMDB(root).joints("clap", "v_clap_1")
    assert joints.shape == (3, 15, 2) and joints.dtype == np.float64
    assert tuple(joints[2, 4]) == (0.0, 9.5)
    assert tuple(joints[0, 0]) == (6.25, -1.0)
    assert tuple(joints[1, 14]) == (-1.0, -1.0)


@pytest.mark.parametrize("damage", ["bad line", "missing video", "no splits", "bad joints"])
def test_jhmdb_refuses_broken_trees_naming_the_path(tmp_path, damage):
    root = make_jhmdb(tmp_path)
    if damage == "bad line":
        (root / "splits/run_test_split1.txt").write_text("v_run_1.avi 3\n")
        expected = r"run_test_split1\.txt, line 1"
    elif damage == "missing video":
        (root / "Rename_Images/run/v_run_1").rename(root / "Rename_Images/run/other")
        expected = "Rename_Images/run/v_run_1"
    elif damage == "no splits":
        for path in (root / "splits").glob("*_test_split1.txt"):
            path.unlink()
        expected = "_test_split1.txt"
    else:
        scipy.io.savemat(root / "joint_positions/run/v_run_1/joint_positions.mat", {"pos_img": np.zeros((2, 13, 3))})
        expected = r"v_run_1/joint_positions\.mat.*\(2, 13, 3\)"
    with pytest.raises(DatasetError, match=expected):
        jhmdb = JHMDB(root)
        for action, video in jhmdb.videos:
            jhmdb.joints(action, video)


# --------------------------------------------------------------------------- VIP


def make_vip(root: Path) -> Path:
    fine = root / "VIP_Fine"
    (fine / "lists").mkdir(parents=True)
    (fine / "lists" / "val_videos.txt").write_text("videos7\nvideos12\n")
    for video in ("videos7", "videos12"):
        for number in (1, 26, 51):
            write_image(fine / "Images" / video / f"{number:012d}.jpg", 4, 6)
        for number in (1, 51):
            ids = np.full((4, 6), 19, np.uint8)
            ids[0, 0] = 255
            write_mask(fine / "Annotations" / "Category_ids" / video / f"{number:012d}.png", ids, "L")
    write_clutter(fine / "Images")
    write_clutter(fine / "Annotations" / "Category_ids" / "videos7")
    return root


def test_vip_reads_videos_frames_and_labels(tmp_path):
    root = make_vip(tmp_path)
    for vip in (VIP(root), VIP(root / "VIP_Fine")):
        assert vip.videos == ["videos7", "videos12"]
        frames = vip.frame_paths("videos7")
        assert [p.name for p in frames] == ["000000000001.jpg", "000000000026.jpg", "000000000051.jpg"]
        labels = vip.label_paths("videos7")
        assert sorted(labels) == [0, 2]
        assert labels[2].name == "000000000051.png"
        label = vip.read_label(labels[0])
        assert label.shape == (4, 6) and label[0, 0] == 255 and label[1, 1] == 19


@pytest.mark.parametrize("damage", ["class id", "orphan label", "list file", "listed video"])
def test_vip_refuses_broken_trees_naming_the_path(tmp_path, damage):
    root = make_vip(tmp_path)
    labels = root / "VIP_Fine/Annotations/Category_ids/videos12"
    if damage == "class id":
        write_mask(labels / "000000000051.png", np.full((4, 6), 20), "L")
        expected = r"000000000051\.png: class ids \[20\]"
    elif damage == "orphan label":
        write_mask(labels / "000000000076.png", np.zeros((4, 6)), "L")
        expected = "000000000076.png"
    elif damage == "list file":
        (root / "VIP_Fine/lists/val_videos.txt").unlink()
        expected = "val_videos.txt"
    else:
        (root / "VIP_Fine/Images/videos12").rename(root / "VIP_Fine/Images/videos13")
        expected = "Images/videos12"
    with pytest.raises(DatasetError, match=expected):
        vip = VIP(root)
        for video in vip.videos:
            for path in vip.label_paths(video).values():
                vip.read_label(path)


# --------------------------------------------------------------------------- real DAVIS


def test_real_davis_sample(davis_real_root):
    davis = DAVIS(davis_real_root)
    assert len(davis.sequences) == 8
    assert sum(len(davis.frame_paths(seq)) for seq in davis.sequences) == 394
    assert all(len(davis.mask_paths(seq)) == len(davis.frame_paths(seq)) for seq in davis.sequences)
    assert [davis.num_objects(seq) for seq in davis.sequences] == [1] * 8
    frames = davis.read_frames("blackswan")
    masks = davis.read_masks("blackswan")
    assert frames.shape == (50, 480, 854, 3) and frames.dtype == np.uint8
    assert masks.shape == (50, 480, 854) and set(np.unique(masks)) <= {0, 1}
    assert masks[0].any()  # the swan is there
    assert read_palette(davis.mask_paths("blackswan")[0]) is not None
    assert davis.palette("blackswan") == davis_palette()  # the files carry the PASCAL VOC palette
