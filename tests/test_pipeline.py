"""prepare (shards), the per-sample transforms, and the Ray Data streams built on them.

The stream tests use frames whose pixels say where they came from: red is a ramp over x, green a
ramp over y, blue a code of (video, frame). Two crops of the same box and flip then have the same
red and green maps, and the blue level names the frame each view was cut from.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stt.config import DataConfig, SpatialConfig
from stt.data import prepare as prep
from stt.data.layouts import DatasetError
from stt.data.pipeline import check_cpu_budget, interleaved_pairs, local_stream, stream_dataset, unit_pairs
from stt.data.plans import (
    Clip,
    Source,
    draw_unit,
    frame_spacing_note,
    raw_frame_step,
    raw_plan,
    resolve_source,
    stream_units,
)
from stt.data.transforms import (
    CropBox,
    crop_resize,
    decode_rgb_or_none,
    pair_crops,
    random_resized_crop_box,
)

HEIGHT, WIDTH = 48, 64
VIDEOS = {"cat": (10, 6), "dog": (35, 6)}  # name -> (first frame number, listed frames); every 5th
CORRUPT = ("dog", 3)  # (video, list position) written truncated


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def blue_code(video_index: int, position: int) -> int:
    return 30 + 100 * video_index + 12 * position


def coded_frame(video_index: int, position: int) -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    red = np.round(x * 255 / (WIDTH - 1))
    green = np.round(y * 255 / (HEIGHT - 1))
    blue = np.full_like(red, blue_code(video_index, position))
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def coded_ytvos(tmp_path_factory) -> Path:
    """A YouTube-VOS train layout of coded frames, one of them truncated."""
    root = tmp_path_factory.mktemp("coded") / "youtube-vos"
    for v, (name, (start, count)) in enumerate(VIDEOS.items()):
        folder = root / "train" / "JPEGImages" / name
        folder.mkdir(parents=True)
        for i in range(count):
            data = jpeg_bytes(coded_frame(v, i))
            if (name, i) == CORRUPT:
                data = data[: len(data) // 2]
            (folder / f"{start + 5 * i:05d}.jpg").write_bytes(data)
    return root


# --------------------------------------------------------------------------- transforms (no Ray)


def test_crop_box_respects_scale_ratio_and_frame():
    rng = np.random.default_rng(0)
    for _ in range(200):
        box = random_resized_crop_box(rng, 180, 320, (0.6, 1.0), (1.5, 2.0))
        assert 0 <= box.top and box.top + box.height <= 180 and 0 <= box.left and box.left + box.width <= 320
        area = box.height * box.width / (180 * 320)
        assert 0.6 - 0.02 <= area <= 1.0
        assert 1.5 - 0.03 <= box.width / box.height <= 2.0 + 0.03  # width / height, rounding aside


def test_crop_box_falls_back_to_a_centred_crop_within_ratio():
    # A portrait 100 x 40 frame cannot hold a 60% crop with width / height >= 1.5.
    box = random_resized_crop_box(np.random.default_rng(0), 100, 40, (0.6, 1.0), (1.5, 2.0))
    assert box == CropBox(top=36, left=0, height=27, width=40)  # height round(40 / 1.5) = 27; top (100 - 27) // 2


def test_crop_resize_by_hand():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    box = CropBox(top=1, left=2, height=2, width=2)
    np.testing.assert_array_equal(crop_resize(image, box, 2, flip=False), image[1:3, 2:4])
    np.testing.assert_array_equal(crop_resize(image, box, 2, flip=True), image[1:3, 2:4][:, ::-1])
    # Shrinking 2 x 2 -> 1 x 1 (bilinear at the centre) and 4 x 4 -> 1 x 1 (area) both average all.
    square = np.array([[[0, 0, 0], [100, 100, 100]], [[20, 20, 20], [40, 40, 40]]], dtype=np.uint8)
    np.testing.assert_array_equal(crop_resize(square, CropBox(0, 0, 2, 2), 1, flip=False), [[[40, 40, 40]]])
    ramp = np.repeat(np.arange(0, 160, 10, dtype=np.uint8).reshape(4, 4, 1), 3, axis=2)  # mean 75, centre mean 75
    ramp[0, 0] = 250  # a corner only averaging sees: mean (75 * 16 + 250) / 16 = 90.6
    assert crop_resize(ramp, CropBox(0, 0, 4, 4), 1, flip=False)[0, 0, 0] == 91
    assert crop_resize(image, box, 7, flip=False).shape == (7, 7, 3)


def test_pair_crops_cut_the_same_place_of_both_frames():
    rng = np.random.default_rng(3)
    target = coded_frame(0, 0)
    reference = coded_frame(1, 2)
    for _ in range(20):
        t, r = pair_crops(target, reference, rng, 16, (0.6, 1.0), (1.5, 2.0))
        np.testing.assert_array_equal(t[..., :2], r[..., :2])  # same red/green maps: same box, same flip
        assert (t[..., 2] == blue_code(0, 0)).all() and (r[..., 2] == blue_code(1, 2)).all()


def test_decode_rejects_empty_truncated_and_garbage_bytes():
    data = jpeg_bytes(coded_frame(0, 0))
    decoded = decode_rgb_or_none(data)
    assert decoded.shape == (HEIGHT, WIDTH, 3) and np.abs(decoded.astype(int) - coded_frame(0, 0)).max() < 10
    assert decode_rgb_or_none(b"") is None
    assert decode_rgb_or_none(data[: len(data) // 2]) is None
    assert decode_rgb_or_none(b"not a jpeg") is None


def test_interleaved_pairs_cover_every_pair_decode_once_and_skip_corrupt():
    decodes = []

    def clip(name, count, bad=()):
        def decode(i):
            decodes.append((name, i))
            return None if i in bad else np.full((2, 2, 3), i, np.uint8)

        return Clip(name, [5 * i for i in range(count)], [f"{name}/{i}" for i in range(count)], decode)

    corrupt = []
    clips = [clip("a", 5), clip("b", 4, bad=(1,)), clip("c", 1)]
    pairs = list(interleaved_pairs(clips, 2, np.random.default_rng(0), corrupt))
    got = sorted((c.name, i, int(t[0, 0, 0]), int(r[0, 0, 0])) for c, i, t, r in pairs)
    # a: (0,2) (1,3) (2,4); b: (0,2) only, (1,3) needs the corrupt frame 1; c: too short.
    assert got == [("a", 0, 2, 0), ("a", 1, 3, 1), ("a", 2, 4, 2), ("b", 0, 2, 0)]
    assert corrupt == ["b/1"]
    assert len(decodes) == len(set(decodes)) == 5 + 4  # each frame of a and b decoded exactly once


def test_draw_unit_visits_every_unit_once_per_epoch():
    epoch0 = [draw_unit(i, 7, seed=1)[0] for i in range(7)]
    epoch1 = [draw_unit(i, 7, seed=1)[0] for i in range(7, 14)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(7)) and epoch0 != epoch1
    assert epoch0 == [draw_unit(i, 7, seed=1)[0] for i in range(7)]


def test_stream_units_by_hand():
    # seed 1 orders 3 units as [0, 1, 2] in epoch 0 and [2, 0, 1] in epoch 1 (draw_unit)
    assert [draw_unit(i, 3, seed=1)[0] for i in range(6)] == [0, 1, 2, 2, 0, 1]
    rows = np.array([3, 0, 5])  # per unit: 8 rows per epoch
    assert stream_units(rows, 1, epochs=2) == range(0, 6)
    assert stream_units(rows, 1, rows=4) == range(0, 3)  # one epoch holds 8 >= 4 rows
    assert stream_units(rows, 1, rows=9) == range(0, 6)  # whole epochs: two
    # a run resumed after 3 rows: unit 0 (rows 0-2) and the empty unit 1 are done; unit 2 starts at row 3
    assert stream_units(rows, 1, rows=5, skip_rows=3) == range(2, 3)
    # after 10 rows: epoch 0 (8 rows) is done, epoch 1's first unit (unit 2: rows 8-12) is not
    assert stream_units(rows, 1, rows=20, skip_rows=10) == range(3, 12)  # up to row 30: 4 epochs
    assert stream_units(rows, 1, rows=1, skip_rows=8) == range(3, 6)
    with pytest.raises(ValueError, match="skip_rows"):
        stream_units(rows, 1, rows=1, skip_rows=-1)


def test_pack_videos_keeps_videos_whole():
    videos = [prep.Video(str(n), tuple(range(n)), ()) for n in (3, 4, 2, 9, 1)]
    groups = prep.pack_videos(videos, 6)
    assert [[len(v.frames) for v in g] for g in groups] == [[3], [4, 2], [9], [1]]


def test_check_cpu_budget():
    check_cpu_budget(2, 0.5, 1.0, cluster_cpus=2)
    with pytest.raises(ValueError, match="leave data_cpus free"):
        check_cpu_budget(2, 1.0, 1.0, cluster_cpus=2)


# --------------------------------------------------------------------------- prepare


def test_prepare_writes_resumes_and_hides_a_killed_shard(tmp_path, monkeypatch):
    from stt.data.synthetic import generate

    src = generate(tmp_path / "raw", preset="tiny", kinds=("ytvos",))["ytvos"]
    out = tmp_path / "shards"
    settings = prep.Settings("ytvos", short_side=48, frames_per_row_group=8, row_groups_per_shard=1)
    videos = prep.list_videos("ytvos", src)
    shards = prep.plan_shards(videos, settings)
    assert len(shards) == 3  # tiny: 3 videos x 5 frames, whole videos per row group of <= 8

    real_table = prep._group_table
    calls = []

    def dies_on_second_shard(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed mid-shard
        return real_table(*args)

    monkeypatch.setattr(prep, "_group_table", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("ytvos", src, str(out), settings)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet", "shard-00001.parquet.tmp"]
    with pytest.raises(DatasetError, match="_manifest.json: missing"):
        prep.read_manifest(str(out))

    monkeypatch.setattr(prep, "_group_table", real_table)
    first_written = (out / "shard-00000.parquet").stat().st_mtime_ns
    manifest = prep.prepare("ytvos", src, "file://" + str(out), settings)  # URIs work as well as paths
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == first_written  # skipped, not rewritten
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json"] + [f"shard-0000{i}.parquet" for i in range(3)]
    assert manifest == json.loads((out / "_manifest.json").read_text())
    assert manifest["frames"] == 15 and manifest["videos"] == 3 and manifest["corrupt_sources"] == []

    table = prep.read_row_group(str(out), "shard-00000.parquet", 0)
    video = videos[0]
    assert table.column("video").to_pylist() == [video.name] * 5
    assert table.column("frame").to_pylist() == list(video.frames)
    assert table.column("source").to_pylist() == [Path(p).relative_to(src).as_posix() for p in video.paths]
    assert set(table.column("height").to_pylist()) == {48} and set(table.column("width").to_pylist()) == {72}
    stored = decode_rgb_or_none(table.column("jpeg")[0].as_py())
    assert stored.shape == (48, 72, 3)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".parquet"}
    prep.prepare("ytvos", src, str(out), settings)
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".parquet"}

    with pytest.raises(ValueError, match="holds shards prepared with settings="):
        prep.prepare(
            "ytvos",
            src,
            str(out),
            prep.Settings("ytvos", short_side=32, frames_per_row_group=8, row_groups_per_shard=1),
        )
    (out / "_manifest.json").unlink()  # an unfinished folder: the shards themselves still refuse other settings
    with pytest.raises(ValueError, match="shard-00000.parquet: holds other videos or settings"):
        prep.prepare(
            "ytvos",
            src,
            str(out),
            prep.Settings("ytvos", short_side=32, frames_per_row_group=8, row_groups_per_shard=1),
        )


def test_prepare_refuses_another_source_and_options_out_of_range(tmp_path):
    """Issue 18: re-preparing into a finished folder from another source kept the old shards under a
    manifest naming the new source; --short-side 0 wrote 1 x 1-pixel shards; --quality 500 passed."""
    from stt.data.synthetic import generate

    settings = prep.Settings("ytvos", short_side=48, frames_per_row_group=8, row_groups_per_shard=1)
    first = generate(tmp_path / "one", preset="tiny", kinds=("ytvos",))["ytvos"]
    second = generate(tmp_path / "two", preset="tiny", kinds=("ytvos",))["ytvos"]  # the same video names
    prep.prepare("ytvos", first, str(tmp_path / "shards"), settings)
    with pytest.raises(ValueError, match=f"holds shards prepared with source='{first}'"):
        prep.prepare("ytvos", second, str(tmp_path / "shards"), settings)
    for option, value in (("short_side", 0), ("quality", 500), ("quality", 0), ("frames_per_row_group", 0)):
        with pytest.raises(ValueError, match=f"--{option.replace('_', '-')}: expected an integer"):
            prep.Settings("ytvos", **{option: value})
    with pytest.raises(ValueError, match="--workers: expected at least 1"):
        prep.prepare("ytvos", first, str(tmp_path / "other"), settings, workers=0)


# --------------------------------------------------------------------------- streams (Ray)


def check_pairs(rows: list[dict], cfg: DataConfig) -> None:
    names = list(VIDEOS)
    for row in rows:
        v = names.index(row["video"])
        start = VIDEOS[row["video"]][0]
        assert row["gap"] == 5 * cfg.frame_gap == row["target_frame"] - row["reference_frame"]
        target, reference = row["target"].astype(int), row["reference"].astype(int)
        assert target.shape == reference.shape == (3, cfg.crop_size, cfg.crop_size)
        for frame_number, view in ((row["target_frame"], target), (row["reference_frame"], reference)):
            assert abs(view[2].mean() - blue_code(v, (frame_number - start) // 5)) < 5  # the frame it claims
        difference = np.abs(target[:2] - reference[:2])
        assert difference.mean() < 3 and difference.max() < 20  # same crop and flip: same ramps
    ramps = {row["target"][0].tobytes() for row in rows}
    assert len(ramps) > len(rows) // 2  # and the crops themselves vary


def expected_pairs(gap: int) -> set[tuple[str, int]]:
    pairs = set()
    for name, (start, count) in VIDEOS.items():
        for i in range(count - gap):
            if CORRUPT[0] == name and CORRUPT[1] in (i, i + gap):
                continue
            pairs.add((name, start + 5 * (i + gap)))
    return pairs


def test_stream_from_raw_and_from_shards(ray_local, coded_ytvos, tmp_path):
    cfg = DataConfig(root=str(coded_ytvos), crop_size=24, frame_gap=1, data_cpus=1.0)
    raw = stream_dataset("temporal", cfg, seed=0)
    assert raw.rows_per_epoch == 10
    rows = raw.dataset.take_all()
    assert {(r["video"], r["target_frame"]) for r in rows} == expected_pairs(1) and len(rows) == 8
    assert raw.skipped_frames() == 1
    assert ray_local.get(raw.skipped.first_sources.remote()) == [str(coded_ytvos / "train/JPEGImages/dog/00050.jpg")]
    check_pairs(rows, cfg)

    out = tmp_path / "shards"
    manifest = prep.prepare("ytvos", coded_ytvos, str(out), prep.Settings("ytvos", quality=95))
    assert manifest["corrupt_sources"] == ["train/JPEGImages/dog/00050.jpg"]
    cfg2 = DataConfig(root=str(out), crop_size=24, frame_gap=2, data_cpus=1.0)
    sharded = stream_dataset("temporal", cfg2, seed=0, epochs=2)
    assert sharded.units_per_epoch == 1
    rows = sharded.dataset.take_all()
    assert sorted((r["video"], r["target_frame"]) for r in rows) == sorted(list(expected_pairs(2)) * 2)
    assert sharded.skipped_frames() == 2  # the corrupt frame, once per epoch
    check_pairs(rows, cfg2)

    def by_pair(rows):
        return {(r["video"], r["target_frame"]): r["target"] for r in rows}

    # Seeded: a one-epoch stream repeats the first epoch of the two-epoch one; another seed does not.
    first = by_pair(stream_dataset("temporal", cfg2, source=Source("shards", str(out)), seed=0).dataset.take_all())
    other = by_pair(stream_dataset("temporal", cfg2, seed=1).dataset.take_all())
    two_epochs = [((r["video"], r["target_frame"]), r["target"]) for r in rows]
    assert all(any(k == key and np.array_equal(first[k], t) for key, t in two_epochs) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_spatial_views_skip_and_count_corrupt_images(ray_local, tmp_path):
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"img{i}.jpg").write_bytes(jpeg_bytes(coded_frame(0, i)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    cfg = DataConfig(images=str(tmp_path / "images"), data_cpus=1.0)
    stream = stream_dataset("spatial", cfg, SpatialConfig(image_size=20), seed=0)
    rows = stream.dataset.take_all()
    assert sorted(r["image"] for r in rows) == [f"class_a/img{i}.jpg" for i in range(3)]
    for row in rows:
        assert row["view_q"].shape == row["view_k"].shape == (3, 20, 20) and row["view_q"].dtype == np.float32
        assert not np.array_equal(row["view_q"], row["view_k"])  # two independent augmentations
    assert stream.skipped_frames() == 1


def test_temporal_stream_refuses_image_shards_and_unknown_roots(ray_local, tmp_path):
    with pytest.raises(DatasetError, match="not a shard folder"):
        stream_dataset("temporal", DataConfig(root=str(tmp_path)))
    with pytest.raises(ValueError, match="frame_gap"):
        stream_dataset("temporal", DataConfig(root=str(tmp_path), frame_gap=0), source=Source("ytvos", str(tmp_path)))


def test_all_frames_layout_pairs_are_as_far_apart_as_configured():
    """ytvos-real lists every raw frame (24 fps): frame_gap counts list steps, so 4 steps are 4 raw frames
    (0.167 s, YouTube-VOS's 5 raw frames at 30 fps), whichever folder of the download is given."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "ytvos-real"
    if not (root / "train_all_frames" / "JPEGImages").is_dir():
        pytest.skip(f"real YouTube-VOS sample not found at {root}")
    for given in (root, root / "train_all_frames"):  # the download root, or the split folder itself
        source = resolve_source(str(given))
        assert source.kind == "ytvos"
        plan = raw_plan(source)
        assert raw_frame_step(plan) == 1 and plan.counts.sum() == 2079
    cfg = DataConfig(root=str(root), crop_size=16, frame_gap=4)
    rows = [
        row
        for batch in unit_pairs(plan, 0, None, 0, cfg, lambda corrupt: corrupt.clear())
        for row in batch["gap"].tolist()
    ]
    unit = draw_unit(0, plan.num_units, 0)[0]  # the unit that stream row 0 stands for
    first, last = plan.unit_start[unit], plan.unit_start[unit + 1]
    assert rows == [4] * int((plan.counts[first:last] - 4).sum())  # every pair of the unit, 4 raw frames apart
    # The default frame_gap=1 on such a listing pairs adjacent raw frames: said in one line, not silently.
    assert "lists every raw frame" in frame_spacing_note(plan, 1, str(root))
    assert frame_spacing_note(plan, 4, str(root)) is None


def test_local_stream_is_the_ray_data_stream_decoded_in_process(ray_local, coded_ytvos):
    """data.decode_in_worker: the same pairs, crops and order of units as Ray Data, endless, resumable."""
    cfg = DataConfig(root=str(coded_ytvos), crop_size=24, frame_gap=1, data_cpus=1.0)
    by_ray = {
        (r["video"], r["target_frame"]): r["target"] for r in stream_dataset("temporal", cfg, seed=3).dataset.take_all()
    }
    corrupt_seen = []
    chunks = local_stream(
        "temporal", cfg, SpatialConfig(), seed=3, skip_rows=0, report=lambda c: (corrupt_seen.extend(c), c.clear())
    )
    local = [
        row
        for chunk in itertools.islice(chunks, 3)
        for row in zip(chunk["video"], chunk["target_frame"], chunk["target"])
    ]
    first_epoch = {(video, frame): target for video, frame, target in local[: len(by_ray)]}
    assert first_epoch.keys() == by_ray.keys() == expected_pairs(1)
    assert all(np.array_equal(first_epoch[key], by_ray[key]) for key in by_ray)  # same crops: same randomness
    assert len(local) > len(by_ray) and corrupt_seen  # it runs on into the next epoch; the corrupt frame is reported
    # A resumed run past the first epoch (10 rows as counted before corrupt frames drop 2) starts with epoch 2's unit.
    resumed = next(local_stream("temporal", cfg, SpatialConfig(), seed=3, skip_rows=10, report=lambda c: c.clear()))
    assert list(resumed["target_frame"]) == [
        frame for _, frame, _ in local[len(by_ray) : len(by_ray) + len(resumed["target_frame"])]
    ]
