"""The per-worker training loop of stt.train: one Ray Train worker of one stage.

The worker reads like one loop (`train_loop_per_worker`): restore, build the stage
(stt.stages.StageModel, from the StageSpec that stt.recipes.stage_spec resolved once on the
driver), iterate, report, checkpoint (stt.checkpoint's one-file format); every call into Ray is
marked `# Ray:`. `MetricsLogger` is the other end of its reports: the Ray Train callback (run in the controller, on
the driver's node) that copies them to TensorBoard and the Ray dashboard. The rate follows `learning_rate`: warmed
up linearly over `train.warmup_steps`, then a cosine to zero at `train.max_steps`.

Metrics (loss terms, lr, pairs/s, the fraction of wall time spent waiting for data, DAVIS J&F
every `train.eval_every` steps) go to `ray.train.report`, to TensorBoard under
`<storage>/<name>/tensorboard` (local storage; `--tensorboard DIR` otherwise) and, as Ray metrics
named `stt_train_*`, to the Ray dashboard. Each evaluation also puts a panel of the first DAVIS
sequence's propagated masks in TensorBoard (Images, `<stage>/davis_masks`). Rank 0 prints a line
per report: step, elapsed time, an ETA from this run's mean step time (its first step left out) and
the numbers.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from stt import checkpoint, published
from stt.allocator import retain_freed_memory
from stt.config import Config
from stt.data.batches import local_batches, prefetched, stage_batches
from stt.observe import MASKS_PNG, progress_text
from stt.recipes import StageSpec
from stt.stages import NonFiniteStep, StageModel


# ----------------------------------------------------------------------------------------- schedule
def learning_rate(step: int, peak_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The lr of optimisation step `step` (0-based): linear warm-up to `peak_lr`, then cosine to 0.

    Warm-up: peak_lr * (step + 1) / warmup_steps for step < warmup_steps. Then
    0.5 * peak_lr * (1 + cos(pi * (step - warmup_steps) / (max_steps - warmup_steps))).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------- metering
class WindowMeter:
    """Averages losses, and measures throughput and data waiting, over the steps between reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.data_wait_s = 0.0
        self.started = time.perf_counter()

    def add(self, losses: dict[str, Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
        self.steps += 1

    def summary(self, pairs_per_step: int) -> dict[str, float]:
        """Mean losses; pairs/s (all workers) and the fraction of wall time spent waiting for a batch."""
        averages = {name: float(total) / self.steps for name, total in self.sums.items()}  # syncs the GPU once
        wall = time.perf_counter() - self.started
        averages["pairs_per_s"] = pairs_per_step * self.steps / wall
        averages["data_wait_fraction"] = self.data_wait_s / wall
        return averages


def worker_batches(spec: StageSpec, start_step: int, skipped, device: torch.device):
    """{stream name: batch} for every step: from the Ray Data shards Ray Train hands this worker, or with
    `data.decode_in_worker` from the same streams decoded here (`prefetched`, so decoding overlaps the steps)."""
    cfg = spec.config
    if not cfg.data.decode_in_worker:
        shards = {name: ray.train.get_dataset_shard(name) for name in spec.streams}  # Ray: this worker's shards
        return stage_batches(shards, cfg.train.batch_size, device)
    from stt.data.pipeline import local_stream, report_corrupt

    streams = {
        name: local_batches(
            local_stream(
                name,
                cfg.data,
                cfg.spatial,
                seed=cfg.train.seed,
                skip_rows=start_step * cfg.train.batch_size,
                report=lambda corrupt: report_corrupt(skipped, corrupt),
                vfs_cfg=cfg.vfs,
            ),
            cfg.train.batch_size,
            list(spec.stage.streams[name]),
            device,
        )
        for name in spec.streams
    }
    return prefetched({name: next(stream) for name, stream in streams.items()} for _ in itertools.count())


# ----------------------------------------------------------------------------------------- evaluation
def davis_jf(checkpoint: Path, cfg: Config, device: torch.device, panel: Path | None = None) -> float:
    """J&F-Mean of label propagation with the checkpoint's encoder on the small held-out DAVIS set.

    `panel`: also write there a PNG of the first sequence's propagated masks (stt.observe.mask_panel:
    a few frames, each as frame | prediction | ground truth), which MetricsLogger puts in TensorBoard.
    """
    from stt.data.synthetic import ensure_dataset
    from stt.evaluate import evaluate_davis
    from stt.observe import davis_panel_png

    root = Path(cfg.train.eval_davis_root) if cfg.train.eval_davis_root else ensure_dataset("davis")
    # a fresh checkpoint's features are never reused; the predicted masks are read back for the panel
    with tempfile.TemporaryDirectory() as features, tempfile.TemporaryDirectory() as results:
        report = evaluate_davis(
            root,
            str(checkpoint),
            cfg,
            out=Path(results) if panel else None,
            split=cfg.train.eval_davis_set,
            device=str(device),
            feature_cache=Path(features),
            progress=False,
        )
        if panel is not None:
            panel.write_bytes(davis_panel_png(root, cfg.train.eval_davis_set, Path(results)))
    return float(report["summary"]["J&F-Mean"])


# ----------------------------------------------------------------------------------------- the worker
def worker_print(line: str) -> None:
    """One line from a training worker to the driver's terminal, once. Ray Train replaces print() in its
    workers with a logger call that also echoes to the redirected stdout, so every line came twice;
    the process's own stdout is what Ray forwards to the driver, and writing there prints it once."""
    print(line, file=sys.__stdout__, flush=True)


def report_skipped(skipped, total: int, named: int) -> int:
    """Print the sources of corrupt frames skipped since the last report (the counter keeps the first
    20); returns how many have been named."""
    if total > named:
        sources = ray.get(skipped.first_sources.remote())  # Ray: the shared counter
        for source in sources[named:]:
            worker_print(f"stt.train: skipped a corrupt frame: {source}")
        if total > len(sources):
            worker_print(f"stt.train: {total} corrupt frames skipped so far (the first {len(sources)} named above)")
    return total


def train_loop_per_worker(config: dict) -> str | None:
    """One Ray Train worker: restore, build the stage, iterate, report, checkpoint.

    `config`: {"spec": the StageSpec, "init": the earlier stage's checkpoint path/URI or "",
    "skipped_frames": the stream's corrupt-frame counter (an actor)}.
    Returns None, or the line saying at which step and in what the stage stopped as a loss term or the
    gradient was not finite (Ray Train hands rank 0's to the driver: `check_stopped`).
    """
    retain_freed_memory()  # the in-training evaluations' activations: stt.allocator
    spec: StageSpec = config["spec"]
    cfg, train = spec.config, spec.config.train
    context = ray.train.get_context()  # Ray: this worker's place in the group
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # Ray: this worker's GPU, or the CPU
    torch.manual_seed(train.seed + rank)

    init = published.load_init(config["init"], config["init"], cfg.model.arch) if config["init"] else None
    stage = StageModel(spec, init, config["init"], device)
    start_step = 0
    latest = ray.train.get_checkpoint()  # Ray: the run's latest checkpoint, when resuming or restarted after a crash
    if latest is not None:
        with latest.as_directory() as folder:
            start_step = stage.restore(checkpoint.load(Path(folder) / checkpoint.CHECKPOINT_FILE, latest.path))
    if device.type == "cuda" and world > 1 and spec.stage.sync_batchnorm(cfg):
        stage.model = nn.SyncBatchNorm.convert_sync_batchnorm(stage.model)
    stage.forward_model = ray.train.torch.prepare_model(  # Ray: DistributedDataParallel across the workers
        stage.model,
        move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": spec.find_unused_parameters},
    )

    batches = worker_batches(spec, start_step, config["skipped_frames"], device)
    peak_lr, pairs_per_step = spec.peak_lr(world), train.batch_size * world
    meter = WindowMeter()
    step, named = start_step, 0
    started, first_step_s = time.perf_counter(), None  # this run's clock, for the progress lines' ETA
    while step < train.max_steps:
        waited = time.perf_counter()
        batch = next(batches)
        meter.data_wait_s += time.perf_counter() - waited
        lr = learning_rate(step, peak_lr, train.warmup_steps, train.max_steps)
        try:
            meter.add(stage.step(batch, lr))
        except NonFiniteStep as error:
            # Every worker stops at this step (the flags are all-reduced). Returned, not raised: Ray Train would
            # restart a failed worker group from its last checkpoint, into the same NaN, `--max-failures` times.
            return (
                f"the {spec.name} stage stopped at step {step + 1} of {train.max_steps}: {error} at lr {lr:.3g}; "
                "no checkpoint is written from this step on; lower the learning rate or the loss weights, and train "
                "under a new --name"
            )
        step += 1
        if first_step_s is None:
            first_step_s = time.perf_counter() - started  # the stream's start and warm-up: left out of the ETA

        evaluation_due = step in train.eval_steps or (train.eval_every and step % train.eval_every == 0)
        checkpoint_due = step % train.checkpoint_every == 0 or step == train.max_steps or evaluation_due
        if not (checkpoint_due or step % train.log_every == 0):
            continue
        metrics = {**meter.summary(pairs_per_step), "step": step, "lr": lr, "start_step": start_step}
        if rank == 0:
            metrics["skipped_frames"] = ray.get(config["skipped_frames"].total.remote())  # Ray: the shared counter
            named = report_skipped(config["skipped_frames"], metrics["skipped_frames"], named)
        if not checkpoint_due:
            ray.train.report(metrics)  # Ray: a barrier across workers; rank 0's numbers reach the callbacks
        else:
            # the stage an EWC stage is anchored to leaves its Fisher; every worker's batches join the mean
            fisher = (
                stage.fisher(batches, spec.fisher_batches) if step == train.max_steps and spec.fisher_batches else None
            )
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:  # one writer: every worker holds the same weights under DDP
                    path = Path(folder) / checkpoint.CHECKPOINT_FILE
                    saving = stage.payload(step, fisher)
                    # the steps' checks leave nothing non-finite; this is the last guard (the Fisher, BatchNorm's
                    # running statistics and MoCo's queue are not gradients)
                    checkpoint.check_finite(saving, f"the {spec.name} stage's checkpoint at step {step}")
                    torch.save(saving, path)
                    if evaluation_due:
                        metrics["J&F"] = davis_jf(path, cfg, device, panel=Path(folder) / MASKS_PNG)
                    saved = ray.train.Checkpoint.from_directory(folder)
                # Ray: stored under the run's storage, the latest `--keep-checkpoints` kept
                ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"{spec.name}-step{step:07d}")
        if rank == 0:
            clock = progress_text(
                step - start_step, train.max_steps - start_step, time.perf_counter() - started, first_step_s
            )
            worker_print(
                f"stt.train {spec.name} step {step}/{train.max_steps}  {clock}  "
                + "  ".join(
                    f"{name} {value:.4g}" for name, value in metrics.items() if name not in ("step", "start_step")
                )
            )
        meter.reset()


# ----------------------------------------------------------------------------------------- the driver's side
class MetricsLogger(ray.train.UserCallback):
    """A Ray Train callback (it runs in the controller, on the driver's node) that copies rank 0's
    reported numbers to TensorBoard and to Ray metrics `stt_train_<name>` for the dashboard, and an
    evaluated checkpoint's propagated-mask panel to TensorBoard as the image `<stage>/davis_masks`.

    The panel travels as a small PNG inside the checkpoint folder (stt.observe.MASKS_PNG), read here
    from the run's storage. Not in the report's metrics: Ray Train keeps those with every checkpoint
    in its snapshot and the sweep hands them to Tune's result files, which would all carry the
    image. Not written by the worker itself: the TensorBoard folder is a path on the driver's node,
    and rank 0 may run on another node; the checkpoint folder is where both can reach.
    """

    def __init__(self, logdir: str | None, run: str, stage: str, trial: str = ""):
        self.logdir, self.run, self.stage, self.trial = logdir, run, stage, trial
        self.writer = None
        self.gauges: dict[str, Any] = {}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from ray.util.metrics import Gauge

        values = {k: float(v) for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(values["step"])
        if self.logdir and self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(self.logdir)
        for name, value in values.items():
            if self.writer is not None and name != "step":
                self.writer.add_scalar(f"{self.stage}/{name}", value, step)
            if name not in self.gauges:
                self.gauges[name] = Gauge(
                    f"stt_train_{re.sub(r'[^a-zA-Z0-9_]', '_', name)}",
                    description=f"stt.train: {name}",
                    tag_keys=("run", "stage", "trial"),
                )
            # trial "": not a sweep trial; a sweep's trials share run and stage and differ only here
            self.gauges[name].set(value, tags={"run": self.run, "stage": self.stage, "trial": self.trial})
        if self.writer is not None and checkpoint is not None and "J&F" in values:
            self.add_mask_panel(checkpoint, step)
        if self.writer is not None:
            self.writer.flush()

    def add_mask_panel(self, saved: ray.train.Checkpoint, step: int) -> None:
        import io

        import numpy as np
        from PIL import Image

        try:  # Ray: the checkpoint is already persisted to the run's storage (local or s3://)
            with saved.filesystem.open_input_stream(checkpoint.join(saved.path, MASKS_PNG)) as f:
                panel = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
        except FileNotFoundError:
            return  # a checkpoint evaluated by an older stt.train
        except OSError as error:  # the picture is not worth a training run
            print(
                f"stt.train: no mask panel in TensorBoard at step {step}: {' '.join(str(error).split())[:160]}",
                flush=True,
            )
            return
        self.writer.add_image(f"{self.stage}/davis_masks", panel, step, dataformats="HWC")
