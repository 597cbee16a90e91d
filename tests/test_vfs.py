"""stt.vfs (paper 003, VFS as a recipe): the loss against Eq. 5 computed slowly, the contrastive variant
against Eq. 4, the frame sampling of Table 1, the frame-pair stream, the stage's facts, and one real
Ray Train run of 2 steps on the tiny synthetic data, evaluated by the same propagation as every model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from stt.config import load_config
from stt.recipes import stage_spec
from stt.spatial import info_nce
from stt.stages import StageModel
from stt.vfs import VFS, sample_frame_pair, vfs_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def eq5_slow(p: torch.Tensor, z: torch.Tensor) -> float:
    """Mean over the batch of ||p_i/||p_i|| - z_j/||z_j|| ||^2, one sample at a time in float64."""
    total = 0.0
    for p_row, z_row in zip(p.double(), z.double()):
        p_unit = p_row / math.sqrt(sum(float(v) ** 2 for v in p_row))
        z_unit = z_row / math.sqrt(sum(float(v) ** 2 for v in z_row))
        total += sum((float(a) - float(b)) ** 2 for a, b in zip(p_unit, z_unit))
    return total / len(p)


def test_vfs_loss_is_eq5_symmetrised_with_stop_gradient():
    torch.manual_seed(0)
    p1, z1, p2, z2 = (torch.randn(5, 7, requires_grad=True) for _ in range(4))
    loss = vfs_loss(p1, z1, p2, z2)
    expected = 0.5 * eq5_slow(p1.detach(), z2.detach()) + 0.5 * eq5_slow(p2.detach(), z1.detach())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None  # the target branch gets no gradient
    same = torch.randn(3, 4)
    assert vfs_loss(same, same, same * 2, same).item() == pytest.approx(0.0, abs=1e-6)  # identical directions
    assert vfs_loss(same, -same, same, -same).item() == pytest.approx(4.0, abs=1e-5)  # opposite directions


def test_contrastive_variant_is_eq4():
    """vfs.negatives=true trains MoCo v2 on frame pairs: its InfoNCE is Eq. 4, computed here by hand."""
    torch.manual_seed(1)
    p = torch.nn.functional.normalize(torch.randn(3, 6), dim=1)
    z = torch.nn.functional.normalize(torch.randn(3, 6), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(5, 6), dim=1)
    tau = 0.2
    slow = 0.0
    for i in range(3):
        positive = math.exp(float(p[i] @ z[i]) / tau)
        negatives = sum(math.exp(float(p[i] @ u) / tau) for u in bank)
        slow += -math.log(positive / (positive + negatives))
    assert info_nce(p, z, bank, tau).item() == pytest.approx(slow / 3, rel=1e-5)


def test_distant_sampling_draws_one_frame_in_each_half():
    rng = np.random.default_rng(0)
    for length in (2, 3, 5, 10, 61):
        draws = [sample_frame_pair(length, rng) for _ in range(300)]
        assert all(0 <= i < j < length for i, j in draws)
        assert all(
            i < length / 2 <= j + 0.5 for i, j in draws
        )  # I_1 in [0, L/2), I_2 in [L/2, L) (odd L: the middle frame may be shared)
        if length >= 10:  # uniform within each half: every frame of it is drawn
            assert {i for i, _ in draws} == set(range(math.ceil(length / 2)))
            assert {j for _, j in draws} == set(range(length // 2, length))
    assert all(j - i == 8 for i, j in (sample_frame_pair(40, rng, "continuous", 8) for _ in range(50)))
    i, j = sample_frame_pair(5, rng, "continuous", 32)
    assert (i, j) == (0, 4)  # the interval shrinks to fit a short video
    with pytest.raises(ValueError, match="at least 2 frames"):
        sample_frame_pair(1, rng)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from stt.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data"), preset="tiny", kinds=("ytvos", "davis"))


def test_vfs_stream_pairs_two_frames_of_one_video_each_augmented_on_its_own(tiny_data):
    from stt.data.pipeline import local_stream

    cfg = load_config(None, ["vfs.image_size=48", f"data.root={tiny_data['ytvos']}"])
    chunks = list(
        itertools.islice(
            local_stream("vfs", cfg.data, cfg.spatial, seed=3, skip_rows=0, report=list.clear, vfs_cfg=cfg.vfs), 4
        )
    )
    for chunk in chunks:
        assert chunk["view_q"].shape[1:] == (3, 48, 48) and chunk["view_k"].shape == chunk["view_q"].shape
        assert chunk["view_q"].dtype == np.float32
        assert (chunk["first_frame"] < chunk["second_frame"]).all()
        assert len(set(chunk["video"])) == len(chunk["video"])  # one pair per video per epoch
        assert not np.allclose(chunk["view_q"], chunk["view_k"])
    again = next(local_stream("vfs", cfg.data, cfg.spatial, seed=3, skip_rows=0, report=list.clear, vfs_cfg=cfg.vfs))
    np.testing.assert_array_equal(again["view_q"], chunks[0]["view_q"])  # reproducible from the seed


def test_vfs_stage_facts_and_one_step_of_each_objective():
    cfg = load_config(None, ["train.recipe=vfs", "train.batch_size=32"])
    spec = stage_spec(cfg, "vfs")
    assert (spec.streams, spec.optimiser, spec.lr_section, spec.config.model.input_space) == (
        ("vfs",),
        "sgd",
        "vfs",
        "rgb",
    )
    assert spec.peak_lr(8) == pytest.approx(0.05)  # paper 003 Sec. 4.1: 0.05 at a batch of 256
    assert spec.temporal is None and not spec.teacher and not spec.lwf

    torch.manual_seed(0)
    batch = {"vfs": {"view_q": torch.randn(4, 3, 64, 64), "view_k": torch.randn(4, 3, 64, 64)}}
    stage = StageModel(stage_spec(load_config(None, ["train.recipe=vfs"]), "vfs"), None, "", torch.device("cpu"))
    assert isinstance(stage.model, VFS)
    losses = stage.step(batch, 0.05)
    assert 0 <= losses["loss"].item() <= 4
    # its heads travel in the checkpoint, so a resumed run continues with them
    payload = stage.payload(1)
    assert any(key.startswith("projector.") for key in payload["moco"]) and set(payload["model"]) == set(
        stage.encoder.state_dict()
    )
    contrastive = StageModel(
        stage_spec(
            load_config(
                None, ["train.recipe=vfs", "vfs.negatives=true", "spatial.queue_size=16", "spatial.bn_splits=2"]
            ),
            "vfs",
        ),
        None,
        "",
        torch.device("cpu"),
    )
    assert "global_queue" in dict(contrastive.model.named_buffers())
    assert contrastive.step(batch, 0.05)["loss"].item() > 0


def test_vfs_config_ranges_are_checked():
    from stt.errors import UsageError

    with pytest.raises(UsageError, match="vfs.sampling"):
        load_config(None, ["vfs.sampling=random"])
    with pytest.raises(UsageError, match="vfs.crop_scale"):
        load_config(None, ["vfs.crop_scale=[0.5,0.2]"])
    with pytest.raises(UsageError, match="vfs.lr"):
        load_config(None, ["vfs.lr=0"])


def test_vfs_recipe_two_steps_on_ray_train_then_evaluated(ray_local, tiny_data, tmp_path):
    """One worker, Ray Data's VFS stream, 2 steps, J&F by the same propagation as every stt model."""
    from stt.train import main

    finals = main(
        [
            "--workers",
            "1",
            "--cpu",
            "--stage",
            "all",
            "--max-steps",
            "2",
            "--storage",
            str(tmp_path),
            "--name",
            "vfs",
            "--cpus-per-worker",
            "0.5",
            "train.recipe=vfs",
            "train.batch_size=2",
            "train.warmup_steps=1",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "train.eval_every=2",
            "vfs.image_size=64",
            f"data.root={tiny_data['ytvos']}",
            f"train.eval_davis_root={tiny_data['davis']}",
        ]
    )
    assert list(finals) == ["vfs"]
    payload = torch.load(finals["vfs"], map_location="cpu", weights_only=True)
    assert (payload["stage"], payload["step"]) == ("vfs", 2)
    from stt.config import from_dict
    from stt.models import build_encoder

    cfg = from_dict(payload["config"])
    assert cfg.model.input_space == "rgb"
    build_encoder(cfg.model).load_state_dict(payload["model"])  # the stride-8 evaluation layout
    import ray.train

    metrics = max(
        (m for _, m in ray.train.Result.from_path(str(tmp_path / "vfs" / "vfs")).best_checkpoints),
        key=lambda m: m["step"],
    )
    assert 0.0 <= metrics["J&F"] <= 1.0 and 0.0 <= metrics["loss"] <= 4.0
