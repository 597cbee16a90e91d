"""stt.train: schedule and checkpoint format by hand, then real Ray Train runs on a local cluster:
both stages with 2 workers, resuming by name, and a SIGKILLed worker restarted from its checkpoint."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from stt import checkpoint
from stt.checkpoint import CHECKPOINT_FILE
from stt.config import Config, apply_overrides, from_dict, load_config
from stt.errors import UsageError
from stt.models import build_encoder, encoder_state_dict
from stt.recipes import stage_spec
from stt.stages import (
    NonFiniteStep,
    StageModel,
    build_spatial,
    build_temporal,
    ewc_regulariser,
    pass_levels,
    train_one_step,
)
from stt.train import default_cpus_per_worker, main, resumed_step
from stt.trainer import learning_rate

TINY = [
    "model.arch=resnet18",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.eval_every=0",
    "data.crop_size=64",
    "spatial.image_size=64",
    "spatial.queue_size=16",
    "spatial.bn_splits=2",
]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


# ----------------------------------------------------------------------------------------- without Ray
def test_learning_rate_warmup_then_cosine_by_hand():
    # warm-up over 4 steps to 0.8, cosine to 0 over the 8 steps after
    assert [learning_rate(s, 0.8, 4, 12) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert learning_rate(4, 0.8, 4, 12) == pytest.approx(0.8)
    assert learning_rate(6, 0.8, 4, 12) == pytest.approx(0.4 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(8, 0.8, 4, 12) == pytest.approx(0.4)
    assert learning_rate(12, 0.8, 4, 12) == pytest.approx(0.0)
    assert learning_rate(0, 0.8, 0, 10) == pytest.approx(0.8)  # no warm-up


def test_default_learning_rates_are_the_papers_at_the_papers_global_batch():
    """Issue 17: MoCo v2's 0.03 at 256 images (8 workers x 32) and paper 001's Adam 1e-4 at 128 pairs
    (8 x 16, ResNet-18), with no hand arithmetic; the authors' ResNet-50 run (16 x 4 GPUs) gets their 5e-5."""
    spatial = apply_overrides(Config(), ["train.batch_size=32"])
    assert stage_spec(spatial, "spatial").peak_lr(8) == pytest.approx(0.03)
    assert stage_spec(spatial, "spatiotemporal").peak_lr(8) == pytest.approx(
        0.03
    )  # the joint stage trains with MoCo's SGD
    temporal = stage_spec(Config(), "temporal")
    assert temporal.peak_lr(8) == pytest.approx(1e-4)
    assert temporal.peak_lr(4) == pytest.approx(5e-5)
    assert temporal.peak_lr(1) == pytest.approx(1e-4 / 8)  # linear in the global batch
    assert temporal.describe_lr(8) == (
        "stt.train: temporal stage: global batch 128 (16 x 8 workers), effective lr 0.0001 "
        "(temporal.lr 0.0001 x 128 / temporal.lr_batch 128)"
    )


def test_stage_spec_sets_the_input_space_and_leaves_the_original_alone():
    cfg = Config()
    assert stage_spec(cfg, "spatial").config.model.input_space == "rgb"
    assert stage_spec(cfg, "temporal").config.model.input_space == "lab"
    assert cfg.model.input_space == "rgb"


def test_a_mast_trunk_is_refused_before_any_stage_starts():
    """MAST's encoder (stt.models.MastEncoder) evaluates releases only: every stage refuses it on the driver."""
    cfg = Config()
    cfg.model.arch = "mast-resnet18"
    for stage in ("spatial", "temporal", "vfs"):
        with pytest.raises(UsageError, match=r"model.arch=mast-resnet18: MAST's trunk evaluates MAST releases only"):
            stage_spec(cfg, stage)


def test_stage_spec_decides_every_fact_of_a_stage_once():
    """Issue 15: teacher, levels, optimiser, EWC anchor and Fisher batches, from the recipe and config alone."""
    temporal = stage_spec(Config(), "temporal")
    assert (temporal.optimiser, temporal.teacher, temporal.streams) == ("adam", True, ("temporal",))
    assert pass_levels(temporal.temporal, temporal.lwf) == ("res3", "res4", "res5")
    assert not temporal.find_unused_parameters
    no_gc = stage_spec(tiny_config("train.recipe=spatial-then-temporal-no-gc"), "temporal")
    assert no_gc.temporal.beta == 0 and not no_gc.teacher and pass_levels(no_gc.temporal) == ("res3", "res4")
    assert no_gc.find_unused_parameters  # res5 gets no gradient without L_gc
    row1 = stage_spec(
        tiny_config("train.recipe=temporal", "temporal.rec_levels=[res4]", "temporal.alpha=0"), "temporal"
    )
    assert pass_levels(row1.temporal, row1.lwf) == ("res4",)
    joint = stage_spec(tiny_config("train.recipe=spatiotemporal"), "spatiotemporal")
    assert (joint.optimiser, joint.streams, joint.teacher) == ("sgd", ("spatial", "temporal"), False)
    ewc = tiny_config("train.recipe=spatial-then-temporal-ewc", "train.ewc_fisher_batches=3")
    assert (stage_spec(ewc, "spatial").fisher_batches, stage_spec(ewc, "spatial").ewc) == (3, False)
    assert (stage_spec(ewc, "temporal").fisher_batches, stage_spec(ewc, "temporal").ewc) == (0, True)


def test_temporal_stage_without_teacher_is_refused_clearly():
    with pytest.raises(
        ValueError, match=r"temporal.beta=50.0 \(train.recipe=spatial-then-temporal\) needs a frozen teacher"
    ):
        build_temporal(stage_spec(tiny_config(), "temporal"), init=None)
    student, teacher, _ = build_temporal(stage_spec(tiny_config("temporal.beta=0"), "temporal"), init=None)
    assert teacher is None


def test_spatial_checkpoint_opens_weights_only_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = stage_spec(tiny_config(), "spatial").config
    moco, optimizer = build_spatial(cfg)
    views = torch.randn(2, 4, 3, 64, 64)
    train_one_step(lambda: moco(views[0], views[1]), optimizer, 0.1, torch.device("cpu"))
    path = tmp_path / CHECKPOINT_FILE
    torch.save(checkpoint.payload(encoder_state_dict(moco.encoder), cfg, "spatial", 7, optimizer, moco), path)

    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["stage"] == "spatial" and payload["step"] == 7
    assert from_dict(payload["config"]).model.input_space == "rgb"
    assert set(payload["model"]) == {k for k in moco.encoder.state_dict()}  # torchvision names, no wrapper prefixes
    # the encoder weights load into the temporal student (another stride preset)
    student = build_encoder(cfg.model)
    student.load_state_dict(payload["model"])

    # a rebuilt MoCo + optimiser restored from the file takes the same next step as the original
    restored, restored_optimizer = build_spatial(cfg)
    restored.load_state_dict(checkpoint.load(path, "test")["moco"])
    restored_optimizer.load_state_dict(payload["optimizer"])
    for model, opt in ((moco, optimizer), (restored, restored_optimizer)):
        torch.manual_seed(1)  # the key shuffle of shuffle-BN is random
        train_one_step(lambda model=model: model(views[1], views[0]), opt, 0.1, torch.device("cpu"))
    for (name, a), b in zip(moco.state_dict().items(), restored.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_every_recipe_names_the_stage_its_ewc_stage_is_anchored_to():
    from stt.recipes import RECIPES

    anchors = {
        (recipe, stage)
        for recipe in RECIPES
        for stage in ("spatial", "temporal", "spatiotemporal")
        if stage_spec(tiny_config(f"train.recipe={recipe}"), stage).fisher_batches
    }
    assert anchors == {("spatial-then-temporal-ewc", "spatial"), ("temporal-then-spatial-ewc", "temporal")}


def test_spatial_fisher_then_ewc_penalty_on_the_temporal_student():
    torch.manual_seed(0)
    cfg = tiny_config("train.recipe=spatial-then-temporal-ewc", "train.ewc_weight=3")
    spatial = StageModel(stage_spec(cfg, "spatial"), None, "", torch.device("cpu"))
    moco = spatial.moco
    queue_before = moco.global_queue.clone()
    views = iter(
        [{"spatial": {"view_q": torch.randn(4, 3, 32, 32), "view_k": torch.randn(4, 3, 32, 32)}} for _ in range(2)]
    )
    fisher = spatial.fisher(views, 2)
    assert set(fisher) == {name for name, _ in moco.encoder.named_parameters()}
    assert all((value >= 0).all() for value in fisher.values()) and any(value.sum() > 0 for value in fisher.values())
    assert torch.equal(moco.global_queue, queue_before)  # computed on a copy: the trained state is untouched

    init = {"model": {k: v.clone() for k, v in moco.encoder.state_dict().items()}, "fisher": fisher}
    student, _, _ = build_temporal(stage_spec(cfg, "temporal"), init["model"])
    penalty = ewc_regulariser(student, init, cfg, "spatial-final.pt")
    assert penalty().item() == 0.0  # at the anchor
    with torch.no_grad():
        student.conv1.weight.add_(0.5)
    expected = 3 / 2 * (fisher["conv1.weight"] * 0.25).sum()
    torch.testing.assert_close(penalty(), expected)
    with pytest.raises(ValueError, match="spatial-final.pt has none"):
        ewc_regulariser(student, {"model": init["model"]}, cfg, "spatial-final.pt")


def test_a_non_finite_loss_term_or_gradient_stops_the_step_before_the_weights_change():
    """Issue 28: temporal.lr=inf trained on and wrote a checkpoint of NaNs. A step whose loss term or gradient is
    not finite names it and leaves the weights as they were (the optimiser does not step)."""
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.ones(2, 3)

    def nan_term():
        out = model(x).sum()
        rec = out * torch.tensor(float("nan"))
        return {"loss": out + rec, "rec": rec, "lc": out.detach()}

    with pytest.raises(NonFiniteStep, match=r"^the loss term 'rec' is not finite"):  # the term, not only the total
        train_one_step(nan_term, optimizer, 0.1, torch.device("cpu"))

    def nan_gradient():  # a finite loss (0) whose gradient is not: d|w - w0|^0.5 at w0
        return {"loss": (model.weight - model.weight.detach()).abs().sqrt().sum()}

    with pytest.raises(NonFiniteStep, match=r"^the gradient is not finite"):
        train_one_step(nan_gradient, optimizer, 0.1, torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())
    train_one_step(lambda: {"loss": model(x).sum()}, optimizer, 0.1, torch.device("cpu"))  # finite: it steps
    assert not torch.equal(model.weight, before["weight"])


def test_a_checkpoint_with_non_finite_tensors_is_refused_naming_one():
    weights = {"layer1.0.conv1.weight": torch.ones(2), "bn1.running_var": torch.tensor([1.0, float("inf")])}
    weights["fc.weight"] = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match=r"^run.pt: 2 of 3 tensors hold NaN or infinite values \(the first: bn1"):
        checkpoint.check_finite(weights, "run.pt")
    checkpoint.check_finite({"model": {"w": torch.ones(2)}, "step": 3, "queue": [torch.zeros(2)]}, "run.pt")


def test_checkpoint_load_names_the_file_when_it_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="weights.pt: not an stt.train checkpoint"):
        checkpoint.load(path, str(path))


# ----------------------------------------------------------------------------------------- on a local Ray cluster
def test_a_cpu_only_worker_gets_its_whole_share_of_the_cpus_as_torch_threads(ray_local):
    # The session's cluster has 2 CPUs. One worker that decodes its own pairs computes on both; Ray Data's
    # reservation comes first; a share of one CPU or more is whole, as Ray gives a worker whole torch threads.
    assert default_cpus_per_worker(1, False, 0.0) == 2.0
    assert default_cpus_per_worker(1, False, 0.5) == 1.0  # 1.5 CPUs would still be one thread
    assert default_cpus_per_worker(2, False, 1.0) == 0.5
    assert default_cpus_per_worker(2, True, 0.0) == 1.0  # GPU workers: the GPU computes

    @ray_local.remote(num_cpus=default_cpus_per_worker(1, False, 0.0))
    def torch_threads() -> int:
        return torch.get_num_threads()

    assert ray_local.get(torch_threads.remote()) == 2


def test_skipped_corrupt_frames_are_named_once(ray_local, capfd):
    """Issue 18: corrupt training frames were counted, never named."""
    from stt.data.pipeline import SkippedFrames
    from stt.trainer import report_skipped

    skipped = SkippedFrames.remote(keep=2)
    assert report_skipped(skipped, 0, 0) == 0 and capfd.readouterr().out == ""
    ray_local.get(skipped.add.remote(["a/00001.jpg"]))
    named = report_skipped(skipped, 1, 0)
    ray_local.get(skipped.add.remote(["b/00002.jpg", "c/00003.jpg"]))
    report_skipped(skipped, 3, named)
    assert capfd.readouterr().out.splitlines() == [
        "stt.train: skipped a corrupt frame: a/00001.jpg",
        "stt.train: skipped a corrupt frame: b/00002.jpg",
        "stt.train: 3 corrupt frames skipped so far (the first 2 named above)",
    ]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from stt.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data"), preset="tiny", kinds=("ytvos", "davis"))


# 2 cores shared by the whole test session: oversubscribed threads make torch 10x slower.
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(storage: Path, name: str, stage: str, steps: int, data: dict, *extra: str) -> dict[str, str]:
    return main(
        [
            "--workers",
            "2",
            "--cpu",
            "--stage",
            stage,
            "--max-steps",
            str(steps),
            "--storage",
            str(storage),
            "--name",
            name,
            "--cpus-per-worker",
            "0.5",
            *TINY,
            f"data.root={data['ytvos']}",
            f"train.eval_davis_root={data['davis']}",
            *extra,
        ]
    )


def reported(run_dir: Path) -> list[dict]:
    """The metrics attached to each checkpoint Ray Train kept for a run, oldest first."""
    import ray.train

    result = ray.train.Result.from_path(str(run_dir))
    return sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["step"])


def test_both_stages_on_two_workers_then_resume_by_name(ray_local, tiny_data, tmp_path):
    finals = run(tmp_path, "both", "all", 2, tiny_data, "train.eval_every=2")
    for stage, space in (("spatial", "rgb"), ("temporal", "lab")):
        payload = torch.load(finals[stage], map_location="cpu", weights_only=True)
        assert (payload["stage"], payload["step"]) == (stage, 2)
        assert from_dict(payload["config"]).model.input_space == space
        build_encoder(from_dict(payload["config"]).model).load_state_dict(payload["model"])
        metrics = reported(tmp_path / "both" / stage)[-1]
        assert 0.0 <= metrics["J&F"] <= 1.0 and metrics["pairs_per_s"] > 0 and 0 <= metrics["data_wait_fraction"] <= 1

    # the same name again with more steps: each stage continues from its step-2 checkpoint, its
    # stream from the rows after the ones 2 steps consumed
    assert resumed_step(str(tmp_path / "both" / "temporal")) == 2 and resumed_step(str(tmp_path / "none")) == 0
    finals = run(tmp_path, "both", "temporal", 4, tiny_data, f"--init={finals['spatial']}")
    assert torch.load(finals["temporal"], weights_only=True)["step"] == 4
    assert [(m["step"], m["start_step"]) for m in reported(tmp_path / "both" / "temporal")][-2:] == [(2, 0), (4, 2)]


def test_temporal_then_spatial_with_ewc_on_two_workers(ray_local, tiny_data, tmp_path):
    finals = run(
        tmp_path, "ts", "all", 2, tiny_data, "train.recipe=temporal-then-spatial-ewc", "train.ewc_fisher_batches=2"
    )
    assert list(finals) == ["temporal", "spatial"]
    temporal = torch.load(finals["temporal"], map_location="cpu", weights_only=True)
    assert temporal["fisher"].keys() == {
        name for name, _ in build_encoder(from_dict(temporal["config"]).model).named_parameters()
    }
    assert any(value.sum() > 0 for value in temporal["fisher"].values())
    spatial = torch.load(finals["spatial"], map_location="cpu", weights_only=True)
    assert (spatial["stage"], spatial["step"]) == ("spatial", 2) and from_dict(
        spatial["config"]
    ).model.input_space == "rgb"
    assert "fisher" not in spatial  # nothing is anchored to the last stage
    assert reported(tmp_path / "ts" / "spatial")[-1]["penalty"] > 0  # step 2 starts away from the anchor


def test_spatiotemporal_stage_on_two_workers(ray_local, tiny_data, tmp_path):
    finals = run(tmp_path, "joint", "all", 2, tiny_data, "train.recipe=spatiotemporal", "train.gamma=0.5")
    payload = torch.load(finals["spatiotemporal"], map_location="cpu", weights_only=True)
    assert (payload["stage"], payload["step"]) == ("spatiotemporal", 2) and "moco" in payload
    assert from_dict(payload["config"]).model.input_space == "lab"
    metrics = reported(tmp_path / "joint" / "spatiotemporal")[-1]
    assert metrics["loss"] == pytest.approx(
        metrics["nce"] + 0.5 * (metrics["rec_res3"] + metrics["rec_res4"] + 1000 * metrics["lc"]), rel=1e-4
    )


def ray_train_worker_pids() -> list[int]:
    """Ray Train worker processes of THIS test's Ray cluster: titled `ray::RayTrainWorker...` and
    descended from this process (ray.init started the raylet, which forks the workers)."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            titles[int(entry.name)] = (entry / "cmdline").read_bytes()
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, title in titles.items() if title.startswith(b"ray::RayTrainWorker") and mine(pid)]


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(ray_local, tiny_data, tmp_path):
    # written once a checkpoint is registered (its folder appears earlier, while it is uploaded)
    registered = tmp_path / "killed" / "spatial" / "checkpoint_manager_snapshot.json"
    killed: list[int] = []
    earlier = set(ray_train_worker_pids())  # processes of the previous test's runs may not have exited yet

    def kill_one_worker_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while not registered.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [pid for pid in ray_train_worker_pids() if pid not in earlier]
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    finals = run(tmp_path, "killed", "spatial", 12, tiny_data, "--keep-checkpoints=20")
    killer.join()
    assert killed, "no Ray Train worker process was found to kill"
    assert torch.load(finals["spatial"], weights_only=True)["step"] == 12
    starts = {m["start_step"] for m in reported(tmp_path / "killed" / "spatial")}
    assert starts - {0}, f"no report came from a restarted worker group (start steps {starts})"
    assert min(starts - {0}) >= 2 and min(starts - {0}) % 2 == 0  # it resumed at a checkpoint, not from scratch


def test_training_stops_at_the_first_non_finite_step_and_writes_no_checkpoint(ray_local, tiny_data, tmp_path):
    """Issue 28: a learning rate that diverges (finite, so the config accepts it) stops the stage with one line
    naming the step and the term, from the workers' return value: not retried by Ray Train, nothing exported."""
    with pytest.raises(
        NonFiniteStep, match=r"^the spatial stage stopped at step 2 of 4: the (loss term 'loss'|gradient)"
    ):
        run(tmp_path, "diverged", "spatial", 4, tiny_data, "spatial.lr=1e30")
    assert not (tmp_path / "diverged" / "spatial-final.pt").exists()
    assert not list((tmp_path / "diverged" / "spatial").glob("*/checkpoint.pt"))
