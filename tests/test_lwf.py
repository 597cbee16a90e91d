"""stt.lwf (Learning without Forgetting after the spatial stage, paper 000 Table 5(b) "+ LwF"): the loss
against a hand-computed value, the frozen old network's outputs, the temporal step with the term, the
stage's facts, and the recipe run on Ray Train (2 steps per stage, 1 worker)."""

from __future__ import annotations

import math

import pytest
import torch

from stt.color import imagenet_normalize
from stt.config import load_config
from stt.lwf import LwF, lwf_loss
from stt.models import build_teacher
from stt.recipes import stage_spec
from stt.stages import StageModel, pass_levels, temporal_batch_loss

TINY = [
    "train.recipe=spatial-then-temporal-lwf",
    "train.batch_size=4",
    "spatial.image_size=64",
    "spatial.queue_size=16",
    "spatial.bn_splits=2",
    "data.crop_size=64",
    "train.lwf_weight=3",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_lwf_loss_by_hand():
    # T = 2: teacher logits (0, 2 ln 3) soften to (1/4, 3/4); student logits (0, 0) to (1/2, 1/2)
    teacher = torch.tensor([[0.0, 2 * math.log(3)]])
    student = torch.zeros(1, 2, requires_grad=True)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(teacher || student) = 0.130812
    loss = lwf_loss(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.130812, abs=1e-6)
    loss.backward()
    # d/ds_k of KL at T: (p_student - p_teacher) / T = ((1/2 - 1/4) / 2, (1/2 - 3/4) / 2)
    torch.testing.assert_close(student.grad, torch.tensor([[0.125, -0.125]]))
    rows = torch.randn(3, 5)
    assert lwf_loss(rows, rows, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # nothing forgotten: 0
    # averaged over rows
    two = lwf_loss(torch.zeros(2, 2), torch.tensor([[0.0, 2 * math.log(3)], [0.0, 0.0]]), 2.0)
    assert two.item() == pytest.approx(expected / 2, rel=1e-6)


@pytest.fixture(scope="module")
def spatial_payload():
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    spatial = StageModel(stage_spec(cfg, "spatial"), None, "", torch.device("cpu"))
    spatial.step({"spatial": {"view_q": torch.randn(4, 3, 64, 64), "view_k": torch.randn(4, 3, 64, 64)}}, 0.1)
    return spatial.payload(1)


def test_old_network_outputs_are_mocos_logits_over_its_queue(spatial_payload):
    cfg = load_config(None, TINY)
    lwf = LwF(cfg, spatial_payload, "spatial-final.pt")
    assert lwf.weight == 3 and lwf.temperature == 2 and lwf.queue.shape == (16, 128)
    assert not any(p.requires_grad for p in lwf.parameters())  # the old network and its head stay frozen
    rgb = imagenet_normalize(torch.rand(2, 3, 64, 64))
    # by hand from the checkpoint: MoCo's query encoder, global head, l2 norm, . queue / tau
    moco = spatial_payload["moco"]
    trunk = build_teacher(cfg.model, spatial_payload["model"])
    pooled = trunk(rgb, layers=("res5",))["res5"].mean(dim=(2, 3))
    hidden = torch.relu(pooled @ moco["query_net.global_head.0.weight"].T + moco["query_net.global_head.0.bias"])
    q = torch.nn.functional.normalize(
        hidden @ moco["query_net.global_head.2.weight"].T + moco["query_net.global_head.2.bias"], dim=1
    )
    with torch.no_grad():
        torch.testing.assert_close(lwf.logits(trunk(rgb, layers=("res5",))["res5"]), q @ moco["global_queue"].T / 0.2)
        # the old network itself as the student: nothing forgotten
        assert lwf(rgb, trunk(rgb, layers=("res5",))["res5"]).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="temporal-final.pt has none"):
        LwF(cfg, {"model": spatial_payload["model"]}, "temporal-final.pt")


def test_lwf_stage_facts_and_its_term_in_the_temporal_step(spatial_payload):
    cfg = load_config(None, TINY)
    spec = stage_spec(cfg, "temporal")
    assert spec.lwf and not spec.teacher and not spec.ewc and spec.temporal.beta == 0
    assert (
        pass_levels(spec.temporal, spec.lwf) == ("res3", "res4", "res5") and not spec.find_unused_parameters
    )  # res5 feeds the old head
    assert not stage_spec(cfg, "spatial").lwf and not stage_spec(load_config(), "temporal").lwf

    stage = StageModel(spec, spatial_payload, "spatial-final.pt", torch.device("cpu"))
    torch.manual_seed(1)
    batch = {
        "target": torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8),
        "reference": torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8),
    }
    generator = torch.Generator().manual_seed(0)
    with_lwf = temporal_batch_loss(
        stage.model, None, batch, spec.temporal, torch.Generator().manual_seed(0), lwf=stage.lwf
    )
    without = temporal_batch_loss(stage.model, None, batch, spec.temporal, generator)
    assert with_lwf["lwf"].item() > 0  # a Lab-fed stride-8 student does not reproduce the RGB network's outputs
    assert with_lwf["loss"].item() == pytest.approx(without["loss"].item() + 3 * with_lwf["lwf"].item(), rel=1e-5)
    losses = stage.step({"temporal": batch}, 1e-3)
    assert "lwf" in losses


def test_lwf_recipe_two_steps_per_stage_on_ray_train(ray_local, tmp_path_factory, tmp_path):
    import ray.train

    from stt.data.synthetic import generate
    from stt.train import main

    data = generate(tmp_path_factory.mktemp("data"), preset="tiny", kinds=("ytvos",))
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
            "lwf",
            "--cpus-per-worker",
            "0.5",
            *TINY,
            "train.warmup_steps=1",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "train.eval_every=0",
            "data.decode_in_worker=true",
            f"data.root={data['ytvos']}",
        ]
    )
    assert list(finals) == ["spatial", "temporal"]
    temporal = torch.load(finals["temporal"], map_location="cpu", weights_only=True)
    assert (temporal["stage"], temporal["step"]) == ("temporal", 2)
    metrics = max(
        (m for _, m in ray.train.Result.from_path(str(tmp_path / "lwf" / "temporal")).best_checkpoints),
        key=lambda m: m["step"],
    )
    assert metrics["lwf"] > 0
    assert metrics["loss"] == pytest.approx(
        metrics["rec_res3"] + metrics["rec_res4"] + 1000 * metrics["lc"] + 3 * metrics["lwf"], rel=1e-4
    )
