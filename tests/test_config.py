import re
from pathlib import Path

import pytest

from stt.config import Config, apply_overrides, from_dict, load_config, set_values, to_dict
from stt.errors import UsageError


def test_defaults_match_design():
    cfg = Config()
    assert (cfg.propagation.aggregation, cfg.propagation.temperature, cfg.propagation.topk) == ("overall", 0.07, 10)
    assert (cfg.propagation.context, cfg.propagation.radius, cfg.propagation.window) == (
        20,
        None,
        "square",
    )  # None: per task and stride
    assert (cfg.temporal.alpha, cfg.temporal.beta, cfg.temporal.entropy_threshold) == (1000.0, 50.0, 0.7)
    assert (cfg.temporal.radius_res3, cfg.temporal.radius_res4) == (12, 6)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("temporal:\n  alpha: 500\n  rec_levels: [res4]\npropagation:\n  topk: 5\n")
    cfg = load_config(
        path, ["propagation.topk=7", "propagation.window_first_frame=false", "data.crop_scale=[0.5, 0.9]"]
    )
    assert cfg.temporal.alpha == 500.0 and isinstance(cfg.temporal.alpha, float)
    assert cfg.temporal.rec_levels == ("res4",)
    assert cfg.propagation.topk == 7 and cfg.propagation.window_first_frame is False
    assert cfg.data.crop_scale == (0.5, 0.9)


@pytest.mark.parametrize(
    "override, message",
    [
        ("temporal.alpah=3", "unknown config key 'temporal.alpah'"),
        ("propagation.topk=2.5", "propagation.topk: expected an integer"),
        ("propagation.normalize=maybe", "propagation.normalize: expected true or false"),
        ("data.crop_scale=[1]", "data.crop_scale: expected 2 items"),
        ("temporal=3", "temporal: expected a mapping"),
        ("topk", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises((KeyError, ValueError), match=message.replace("[", r"\[").replace(".", r"\.")):
        apply_overrides(Config(), [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(bad)


def test_dict_round_trip_is_plain():
    cfg = load_config(None, ["temporal.rec_levels=[res4]", "model.arch=resnet50"])
    plain = to_dict(cfg)
    assert plain["temporal"]["rec_levels"] == ["res4"]
    assert from_dict(plain) == cfg


def test_laptop_recipe_loads_with_values_in_range():
    """configs/laptop.yaml (real video on 2 cores): every value the file explains, within sane bounds."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "laptop.yaml")
    assert 64 <= cfg.data.crop_size <= 256 and cfg.data.crop_size % 32 == 0  # res5 at stride 32 needs a multiple
    assert cfg.data.frame_gap == 4  # 4 raw frames at 24 fps = YouTube-VOS's 5 at 30 fps (0.167 s)
    assert cfg.data.decode_in_worker is True
    assert 4 <= cfg.train.batch_size <= 64 and 1e-5 <= cfg.temporal.lr <= 1e-3
    from stt.recipes import stage_spec

    # the rates its learning curves were measured with, on its one worker (BENCHMARKS.md)
    assert stage_spec(cfg, "temporal").peak_lr(1) == pytest.approx(5e-4) and stage_spec(cfg, "spatial").peak_lr(
        1
    ) == pytest.approx(0.03)
    assert 0 < cfg.train.warmup_steps < cfg.train.max_steps and cfg.train.max_steps % cfg.train.checkpoint_every == 0
    assert cfg.spatial.queue_size < 2079  # fewer entries than ytvos-real has frames: no image is its own negative
    assert cfg.eval.max_short_side == 240


def test_the_temporal_rate_moved_to_its_stage(tmp_path):
    """train.lr is the temporal stage's rate only, so it lives in `temporal`: the old key is refused with the
    new name in a config file or override, and read as the new one from a checkpoint stored before the move."""
    from stt.errors import UsageError

    with pytest.raises(UsageError, match=r"config key 'train.lr' is now 'temporal.lr'"):
        apply_overrides(Config(), ["train.lr=5e-4"])
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  lr_batch: 8\n")
    with pytest.raises(UsageError, match=r"old.yaml: config key 'train.lr_batch' is now 'temporal.lr_batch'"):
        load_config(path)
    stored = to_dict(Config())
    del stored["temporal"]["lr"], stored["temporal"]["lr_batch"]
    stored["train"].update(lr=5e-4, lr_batch=8)
    cfg = from_dict(stored, source="old.pt")
    assert (cfg.temporal.lr, cfg.temporal.lr_batch) == (5e-4, 8)
    assert stored["train"]["lr"] == 5e-4  # the caller's mapping is left alone


@pytest.mark.parametrize(
    "override",
    [
        "temporal.lr=inf",  # issue 28: trained, exit 0, a checkpoint with 45 of 120 tensors NaN/Inf
        "temporal.lr=nan",
        "spatial.lr=-inf",
        "temporal.alpha=.inf",  # YAML's own spelling
        "train.ewc_weight=.nan",
        "propagation.radius=inf",  # an optional number
        "train.max_steps=1e400",  # an integer key
        "data.crop_scale=[0.5, inf]",  # inside a tuple
    ],
)
def test_non_finite_numbers_are_refused_where_values_are_parsed(override, tmp_path):
    key, value = override.split("=")
    with pytest.raises(UsageError, match=rf"^{re.escape(key)}: expected a finite number, got .*(inf|nan|1e400)"):
        load_config(None, [override])
    section, name = key.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(UsageError, match=rf"^{path}: {re.escape(key)}: expected a finite number"):
        load_config(path)


def test_set_values_applies_typed_values_to_a_copy_and_validates_them_once():
    cfg = Config()
    new = set_values(
        cfg, {"temporal.alpha": 5, "temporal.rec_levels": ["res4"], "propagation.radius": None, "model.stride": 4}
    )
    assert (new.temporal.alpha, new.temporal.rec_levels, new.propagation.radius, new.model.stride) == (
        5.0,
        ("res4",),
        None,
        4,
    )
    assert isinstance(new.temporal.alpha, float) and cfg.temporal.alpha == 1000.0  # typed as declared; cfg unchanged
    assert set_values(cfg, {"model.weights": "yes"}).model.weights == "yes"  # a value is not parsed as YAML again
    with pytest.raises(UsageError, match="temporal.alpha: expected zero or more, got -1.0"):
        set_values(cfg, {"temporal.alpha": -1})
    with pytest.raises(UsageError, match="propagation.window: expected one of"):
        set_values(cfg, {"propagation.window": "hexagon"})
    with pytest.raises(UsageError, match="unknown config key 'temporal.alpah'"):
        set_values(cfg, {"temporal.alpah": 1})
