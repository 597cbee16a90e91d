"""The spatial stage: InfoNCE, the MoCo queue and momentum encoder, DetCo terms, augmentation, EWC."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stt.color import IMAGENET_MEAN, IMAGENET_STD
from stt.config import ModelConfig, SpatialConfig
from stt.data.augment import TwoViews, blur_kernel_size
from stt.ewc import ewc_penalty, fisher_diagonal
from stt.models import build_teacher, encoder_state_dict
from stt.spatial import MoCo, enqueue, grid_patches, info_nce, info_nce_logits, momentum_update


def slow_info_nce(q, k_pos, queue, tau):
    """Eq. (1) of paper 001, one query at a time, with Python sums."""
    losses = []
    for i in range(q.shape[0]):
        positive = math.exp(float(q[i] @ k_pos[i]) / tau)
        negatives = sum(math.exp(float(q[i] @ k_neg) / tau) for k_neg in queue)
        losses.append(-math.log(positive / (positive + negatives)))
    return sum(losses) / len(losses)


def small_moco(method="moco", **overrides):
    cfg = SpatialConfig(method=method, feature_dim=8, queue_size=12, bn_splits=2, **overrides)
    return MoCo(cfg, ModelConfig(arch="resnet18"))


def test_info_nce_matches_eq1_per_sample():
    generator = torch.Generator().manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 6, generator=generator, dtype=torch.float64), dim=1) for n in (4, 4, 9))
    for tau in (0.2, 1.0):
        assert info_nce(q, k, queue, tau).item() == pytest.approx(slow_info_nce(q, k, queue, tau), rel=1e-12)
    logits = info_nce_logits(q, k, queue, 0.2)
    assert logits.shape == (4, 10)
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)


def test_info_nce_hand_value():
    # q = k+ = e1, one negative e2, tau 0.5: -log(e^2 / (e^2 + e^0))
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert info_nce(e1, e1, e2, 0.5).item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + 1)), rel=1e-6)


def test_enqueue_overwrites_oldest_rows_and_wraps_around():
    queue = torch.zeros(5, 2)
    pointer = torch.zeros((), dtype=torch.long)
    enqueue(queue, pointer, torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert pointer.item() == 3
    assert queue[:, 0].tolist() == [1, 2, 3, 0, 0]
    enqueue(queue, pointer, torch.tensor([[4.0, 4], [5, 5], [6, 6]]))
    assert pointer.item() == 1
    assert queue[:, 0].tolist() == [6, 2, 3, 4, 5]
    enqueue(queue, pointer, torch.tensor([[7.0, 7], [8, 8], [9, 9], [10, 10], [11, 11]]))
    assert pointer.item() == 1 and queue[:, 0].tolist() == [11, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="queue_size"):
        enqueue(queue, pointer, torch.zeros(6, 2))


def test_momentum_update_math():
    key = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    query = [torch.tensor([3.0, 2.0]), torch.tensor([[1.5]])]
    momentum_update(key, query, 0.9)
    torch.testing.assert_close(key[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * -2 + 0.1 * 2]))
    torch.testing.assert_close(key[1], torch.tensor([[0.9 * 0.5 + 0.1 * 1.5]]))
    momentum_update(key, query, 0.0)
    assert torch.equal(key[0], query[0])


def test_grid_patches_are_row_major_crops():
    images = torch.arange(2 * 1 * 7 * 6, dtype=torch.float32).reshape(2, 1, 7, 6)
    patches = grid_patches(images, grid=3)
    assert patches.shape == (18, 1, 2, 2)
    torch.testing.assert_close(patches[0], images[0, :, 0:2, 0:2])
    torch.testing.assert_close(patches[5], images[0, :, 2:4, 4:6])  # row 1, column 2
    torch.testing.assert_close(patches[9 + 7], images[1, :, 4:6, 2:4])  # image 1, row 2, column 1


def test_moco_steps_train_the_query_and_move_the_key_encoder():
    torch.manual_seed(0)
    moco = small_moco(momentum=0.9)
    optimizer = torch.optim.SGD(moco.query_net.parameters(), lr=0.05)
    images = torch.randn(4, 3, 32, 32)
    start_query = [p.detach().clone() for p in moco.query_net.parameters()]
    start_queue = moco.global_queue.clone()
    losses = []
    for _ in range(3):
        key_before = [p.clone() for p in moco.key_net.parameters()]
        query_before = [p.detach().clone() for p in moco.query_net.parameters()]
        out = moco(images + 0.1 * torch.randn_like(images), images + 0.1 * torch.randn_like(images))
        assert out["logits"].shape == (4, 13) and 0 <= out["accuracy"].item() <= 1
        # keys moved by exactly m * theta_k + (1 - m) * theta_q, before this step's gradient
        for k_new, k_old, q_old in zip(moco.key_net.parameters(), key_before, query_before):
            torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q_old)
        optimizer.zero_grad()
        out["loss"].backward()
        # gradients never reach the momentum encoder
        assert all(p.grad is None and not p.requires_grad for p in moco.key_net.parameters())
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(start_query, moco.query_net.parameters()))
    # 3 steps of 4 keys fill the 12-row queue exactly once, pointer back at the start
    assert moco.global_pointer.item() == 0
    assert not torch.equal(moco.global_queue, start_queue)
    torch.testing.assert_close(moco.global_queue.norm(dim=1), torch.ones(12))


def test_enqueued_keys_are_the_momentum_encoders_embeddings_in_input_order():
    torch.manual_seed(1)
    moco = small_moco(momentum=1.0)  # the key encoder does not move
    moco.key_net.eval()  # running-statistics BatchNorm: a key depends on its own image only
    view_q, view_k = torch.randn(2, 4, 3, 32, 32)
    moco(view_q, view_k)
    with torch.no_grad():
        keys = moco._embed(moco.key_net, view_k, order=None)["global"]
    torch.testing.assert_close(moco.global_queue[:4], keys)
    assert moco.global_pointer.item() == 4


def test_eval_mode_has_no_side_effects():
    moco = small_moco(momentum=0.5).eval()
    queue, keys = moco.global_queue.clone(), [p.clone() for p in moco.key_net.parameters()]
    with torch.no_grad():
        out = moco(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert torch.isfinite(out["loss"]) and moco.global_pointer.item() == 0
    assert torch.equal(moco.global_queue, queue)
    assert all(torch.equal(a, b) for a, b in zip(keys, moco.key_net.parameters()))


def test_key_shuffle_restores_input_order():
    torch.manual_seed(2)
    moco = small_moco()
    moco.eval()  # eval-mode BatchNorm: an embedding depends on its own image only
    images = torch.randn(4, 3, 32, 32)
    shuffled = moco._embed(moco.key_net, images, order=torch.tensor([2, 0, 3, 1]))["global"]
    plain = moco._embed(moco.key_net, images, order=None)["global"]
    torch.testing.assert_close(shuffled, plain)


def test_detco_adds_local_and_cross_terms():
    torch.manual_seed(3)
    moco = small_moco("detco")
    view_q, view_k = torch.randn(2, 4, 3, 48, 48)
    out = moco(view_q, view_k)
    total = out["loss_global"] + out["loss_local"] + out["loss_cross"]
    torch.testing.assert_close(out["loss"], total)
    assert moco.local_pointer.item() == 4 and moco.global_pointer.item() == 4
    out["loss"].backward()
    assert moco.query_net["local_head"][0].weight.grad is not None
    assert moco.query_net["local_head"][0].in_features == 9 * 512


def test_spatial_encoder_becomes_the_teacher():
    moco = small_moco()
    teacher = build_teacher(ModelConfig(), encoder_state_dict(moco.encoder))
    assert torch.equal(teacher.layer4[0].conv1.weight, moco.encoder.layer4[0].conv1.weight)


def test_bad_spatial_settings_are_named():
    with pytest.raises(ValueError, match="spatial.method"):
        small_moco("simclr")
    with pytest.raises(ValueError, match="spatial.momentum"):
        small_moco(momentum=1.5)
    with pytest.raises(ValueError, match="bn_splits"):
        small_moco()(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))


def test_bf16_autocast_step_runs_on_cpu():
    moco = small_moco()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moco(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert moco.global_queue.dtype == torch.float32


def test_two_views_are_seeded_normalised_and_accept_pil_and_tensors():
    augment = TwoViews(32)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    view_q, view_k = augment(image, torch.Generator().manual_seed(7))
    again_q, again_k = augment(image, torch.Generator().manual_seed(7))
    assert view_q.shape == view_k.shape == (3, 32, 32) and view_q.dtype == torch.float32
    assert torch.equal(view_q, again_q) and torch.equal(view_k, again_k)
    assert not torch.equal(view_q, view_k)
    tensor_views = augment(torch.from_numpy(pixels).permute(2, 0, 1), torch.Generator().manual_seed(7))
    assert tensor_views[0].shape == (3, 32, 32)
    # a uniform grey image stays uniform through crop, jitter, blur and flip: check normalisation
    grey = Image.new("L", (20, 20), 128)
    flat, _ = augment(grey)
    for channel in range(3):
        values = flat[channel]
        assert torch.allclose(values, values.mean(), atol=1e-5)
        assert values.mean() * IMAGENET_STD[channel] + IMAGENET_MEAN[channel] <= 1.0
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3
    with pytest.raises(ValueError, match="RGB"):
        augment(torch.zeros(1, 8, 8))


def toy_parameters():
    return {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}


def test_fisher_diagonal_hand_value():
    # loss(x, y) = (a x + b - y)^2 at a = 1, b = 0.5; batches (1, 0) and (2, 1): residual 1.5 both
    # d/da = 2 r x = 3 and 6, d/db = 2 r = 3 and 3 -> F_a = (9 + 36) / 2, F_b = (9 + 9) / 2
    params = toy_parameters()
    fisher = fisher_diagonal(
        params, lambda xy: (params["a"] * xy[0] + params["b"] - xy[1]) ** 2, [(1.0, 0.0), (2.0, 1.0)]
    )
    assert fisher["a"].item() == pytest.approx(22.5) and fisher["b"].item() == pytest.approx(9.0)
    assert params["a"].grad is None


def test_ewc_penalty_zero_at_anchor_quadratic_and_hand_value():
    fisher = {"a": torch.tensor(22.5), "b": torch.tensor(9.0)}
    anchor = {"a": torch.tensor(1.0), "b": torch.tensor(0.5)}
    assert ewc_penalty(anchor, anchor, fisher, weight=2.0).item() == 0.0
    # 2 / 2 * (22.5 * (2 - 1)^2 + 9 * (0 - 0.5)^2) = 22.5 + 2.25
    moved = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(0.0, requires_grad=True)}
    penalty = ewc_penalty(moved, anchor, fisher, weight=2.0)
    assert penalty.item() == pytest.approx(24.75)
    penalty.backward()
    assert moved["a"].grad.item() == pytest.approx(2.0 * 22.5 * 1.0)  # lambda F (theta - theta*)
    for t in (0.5, 3.0):
        scaled = {k: anchor[k] + t * (moved[k].detach() - anchor[k]) for k in anchor}
        assert ewc_penalty(scaled, anchor, fisher, 2.0).item() == pytest.approx(t**2 * 24.75)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        ewc_penalty({"a": moved["a"]}, anchor, fisher, 2.0)


def test_fisher_of_the_contrastive_objective_covers_the_encoder():
    torch.manual_seed(4)
    moco = small_moco()
    params = dict(moco.encoder.named_parameters())
    batches = [torch.randn(2, 4, 3, 32, 32) for _ in range(2)]
    fisher = fisher_diagonal(params, lambda views: moco(views[0], views[1])["loss"], batches)
    assert fisher.keys() == params.keys()
    assert all((f >= 0).all() for f in fisher.values()) and fisher["layer4.1.conv2.weight"].sum() > 0
