"""python -m stt.train: the spatial and temporal stages on Ray Train.

    python -m stt.train --workers N --stage spatial|temporal|spatiotemporal|all [--cpu] [--max-steps N]
                        [--storage DIR|s3://...] [--name NAME] [--table1-row ROW] [--config FILE.yaml]
                        [section.key=value ...]

Stage `spatial` trains MoCo v2 on still images (RGB input); stage `temporal` trains the stride-8
student on frame pairs (normalised Lab input) with the frozen spatial encoder as the teacher and
the initialisation; stage `spatiotemporal` trains L_nce + gamma L_t jointly on one trunk. `all`
runs the stages of `train.recipe` (stt.recipes.RECIPES, paper 001 Table 2) in order, each
initialised from the one before; spatial-then-temporal by default. In an EWC recipe the earlier
stage also stores the diagonal Fisher of its objective in its last checkpoint, and the later stage
adds the EWC penalty toward the earlier stage's weights. Each stage is one Ray Train run stored at
`<storage>/<name>/<stage>/`, checkpointed every `train.checkpoint_every` steps; its last checkpoint
is also exported as `<storage>/<name>/<stage>-final.pt`, the file `stt.evaluate --checkpoint`
takes. Re-running with the same storage and name resumes each stage from its latest checkpoint,
and a crashed worker group restarts from it (`--max-failures`); either way the data stream goes on
from the first unit of videos the checkpointed steps had not wholly consumed.

The worker reads like one loop (`train_loop_per_worker`): restore, build the stage
(stt.stages.StageModel, from the StageSpec that stt.recipes.stage_spec resolved once on the
driver), iterate, report, checkpoint (stt.checkpoint's one-file format); every call into Ray is
marked `# Ray:`.

Learning rate: `train.batch_size` is per worker, so the global batch is batch_size x workers. Each
optimiser's rate is given for a reference global batch (`spatial.lr` for `spatial.lr_batch` images
with MoCo's SGD, used by the spatial and the joint stage; `temporal.lr` for `temporal.lr_batch` pairs
with Adam, the temporal stage; `vfs.lr` for `vfs.lr_batch` pairs with VFS's SGD) and scaled linearly to
the actual global batch, so the defaults give the paper's rates at the paper's batches (0.03 at 256
images; 1e-4 at 128 pairs) with no hand arithmetic. The effective rate is printed at the start of each
stage; it is warmed up linearly over `train.warmup_steps` and decayed to zero by a cosine at `train.max_steps`.

Metrics (loss terms, lr, pairs/s, the fraction of wall time spent waiting for data, DAVIS J&F
every `train.eval_every` steps) go to `ray.train.report`, to TensorBoard under
`<storage>/<name>/tensorboard` (local storage; `--tensorboard DIR` otherwise) and, as Ray metrics
named `stt_train_*`, to the Ray dashboard. Each evaluation also puts a panel of the first DAVIS
sequence's propagated masks in TensorBoard (Images, `<stage>/davis_masks`). Rank 0 prints a line
per report: step, elapsed time, an ETA from this run's mean step time (its first step left out) and
the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import re
import socket
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

from stt import checkpoint, command
from stt.config import Config, load_config, to_dict
from stt.data.batches import local_batches, prefetched, stage_batches
from stt.data.pipeline import SkippedFrames, check_cpu_budget, resolve_source
from stt.errors import StorageError, UsageError
from stt.observe import MASKS_PNG, progress_text
from stt.paths import check_apart
from stt.recipes import STAGES, TABLE1_ROWS, StageSpec, recipe_of, stage_spec, table1_config
from stt.stages import NonFiniteStep, StageModel

# the tensors a step reads, per stream
BATCH_COLUMNS = {"spatial": ["view_q", "view_k"], "temporal": ["target", "reference"], "vfs": ["view_q", "view_k"]}


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
            BATCH_COLUMNS[name],
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
    spec: StageSpec = config["spec"]
    cfg, train = spec.config, spec.config.train
    context = ray.train.get_context()  # Ray: this worker's place in the group
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # Ray: this worker's GPU, or the CPU
    torch.manual_seed(train.seed + rank)

    init = checkpoint.load_init(config["init"], config["init"], cfg.model.arch) if config["init"] else None
    stage = StageModel(spec, init, config["init"], device)
    start_step = 0
    latest = ray.train.get_checkpoint()  # Ray: the run's latest checkpoint, when resuming or restarted after a crash
    if latest is not None:
        with latest.as_directory() as folder:
            start_step = stage.restore(checkpoint.load(Path(folder) / checkpoint.CHECKPOINT_FILE, latest.path))
    if (
        device.type == "cuda"
        and world > 1
        and (spec.name == "temporal" or (spec.name == "vfs" and not cfg.vfs.negatives))
    ):
        # MoCo keeps per-worker BatchNorm on purpose: shuffle-BN relies on it (see stt.spatial).
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


# ----------------------------------------------------------------------------------------- orchestration
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


def check_stopped(result: ray.train.Result) -> ray.train.Result:
    """The result of a stage's `fit()`, or NonFiniteStep with the workers' line when they stopped at a non-finite
    loss or gradient (train_loop_per_worker's return value, rank 0's)."""
    if result.return_value:
        raise NonFiniteStep(result.return_value)
    return result


def export_final(result: ray.train.Checkpoint, destination: str) -> None:
    """Copy a Ray checkpoint's one file to `destination` (local path or URI)."""
    with result.as_directory() as folder:  # Ray: fetched from the run's storage
        checkpoint.export(folder, destination)


def training_dataset(spec: StageSpec, stream: str, num_workers: int, stage_dir: str, skipped):
    """One of the stage's Ray Data streams (stt.data.pipeline), from where the run's latest checkpoint
    left off to `train.max_steps` plus the Fisher's batches.

    stream "spatial": two augmented views of each image; "temporal": uint8 RGB frame pairs (the Lab
    input is computed on the worker's device, the teacher takes the RGB); "vfs": two frames of one
    video, each augmented on its own (paper 003). As many epochs as the
    steps need, each in its own order drawn from (seed, epoch). The joint stage reads both, each
    with half of `data.data_cpus`. `skipped`: the run's corrupt-frame counter (a SkippedFrames actor).
    """
    from stt.data import pipeline

    cfg = spec.config
    data = dataclasses.replace(cfg.data, data_cpus=cfg.data.data_cpus / len(spec.streams))
    start_step = resumed_step(stage_dir)
    rows_per_step = cfg.train.batch_size * num_workers
    span = {
        "rows": max(1, (cfg.train.max_steps - start_step + spec.fisher_batches) * rows_per_step),
        "skip_rows": start_step * rows_per_step,
        "skipped": skipped,
        "seed": cfg.train.seed,
    }
    if stream == "spatial":
        built = pipeline.spatial_view_dataset(data, cfg.spatial, **span)
    elif stream == "vfs":
        built = pipeline.vfs_pair_dataset(data, cfg.vfs, **span)
    else:
        built = pipeline.temporal_pair_dataset(data, **span)
    return built.dataset.select_columns(BATCH_COLUMNS[stream])


def resumed_step(stage_dir: str) -> int:
    """The step of the checkpoint Ray Train resumes the run stored at `stage_dir` from (0: a new run)."""
    if not checkpoint.exists(checkpoint.join(stage_dir, "checkpoint_manager_snapshot.json")):
        return 0
    result = ray.train.Result.from_path(stage_dir)  # Ray: the stored run's latest report and checkpoint
    return int(result.metrics["step"]) if result.checkpoint is not None else 0


def build_stage_trainer(
    spec: StageSpec,
    run_dir: str,
    init: str,
    *,
    use_gpu: bool,
    workers: int,
    cpus_per_worker: float,
    callbacks: tuple = (),
    max_failures: int = 3,
    keep_checkpoints: int = 3,
    tensorboard: str | None = None,
    run_name: str = "stt",
    trial: str = "",
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of one stage, stored as the Ray Train run `<run_dir>/<stage>`.

    Everything Ray needs (scaling, storage, failure policy) is declared here; `stt.train` and the
    sweep (which adds a Tune callback) both build their trainers through this function.
    """
    cfg, stage = spec.config, spec.name
    if cfg.data.decode_in_worker and workers != 1:
        raise ValueError(
            f"data.decode_in_worker=true decodes in the one Train worker: expected --workers 1, got {workers}"
        )
    check_cpu_budget(workers, cpus_per_worker, 0.0 if cfg.data.decode_in_worker else cfg.data.data_cpus)
    # Workers print their own progress lines; Ray Data's per-operator bars would flood the terminal.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Train builds the streams in its controller; a wrong data path is reported here, plainly.
    resolve_source(cfg.data.root)
    if cfg.data.images and "spatial" in spec.streams:
        resolve_source(cfg.data.images, images=True)
    skipped = SkippedFrames.remote()  # Ray: an actor every data task and worker reports corrupt frames to

    def dataset_factory(stream: str):
        # Ray Train calls it at every start of the worker group, so a group restarted after a crash
        # streams on from its checkpoint too, not from the first row.
        return lambda: training_dataset(spec, stream, workers, checkpoint.join(run_dir, stage), skipped)

    tensorboard = tensorboard or (None if checkpoint.is_uri(run_dir) else checkpoint.join(run_dir, "tensorboard"))
    return ray.train.torch.TorchTrainer(  # Ray: the worker group, its data, storage and failure policy
        train_loop_per_worker,
        train_loop_config={"spec": spec, "init": init, "skipped_frames": skipped},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=stage,  # same storage and name: Ray Train finds the run's checkpoints and resumes
            storage_path=run_dir,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints or None),  # 0: keep all
            callbacks=[MetricsLogger(tensorboard, run_name, stage, trial), *callbacks],
        ),
        datasets={} if cfg.data.decode_in_worker else {stream: dataset_factory(stream) for stream in spec.streams},
    )


# Keys that never change the weights a stage learns: a resumed run may change them freely.
RESUMABLE_CHANGES = (
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.eval_steps",
    "train.eval_davis_root",
    "train.eval_davis_set",
    "data.data_cpus",
    "data.decode_in_worker",
    "eval.",
    "propagation.",
)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(spec: StageSpec, run_dir: str) -> None:
    """Refuse to resume (or skip as finished) a stage stored under another configuration: re-running a
    finished run with a new lr silently kept the old model. Names every differing key."""
    stage = spec.name
    final, stage_dir = checkpoint.join(run_dir, f"{stage}-final.pt"), checkpoint.join(run_dir, stage)
    if checkpoint.exists(final):
        source, stored = final, checkpoint.load(final)
    elif resumed_step(stage_dir):
        latest = ray.train.Result.from_path(stage_dir).checkpoint  # Ray: the run's latest checkpoint
        with latest.as_directory() as folder:
            source, stored = latest.path, checkpoint.load(Path(folder) / checkpoint.CHECKPOINT_FILE, latest.path)
    else:
        return
    was = flatten(
        to_dict(checkpoint.config_of(stored, source))
    )  # through from_dict: keys added since get their defaults
    now = flatten(to_dict(spec.config))
    differing = [
        k for k in now if now[k] != was.get(k) and not k.startswith(RESUMABLE_CHANGES) and k != "train.max_steps"
    ]
    if now["train.max_steps"] < was["train.max_steps"]:
        differing.append("train.max_steps")  # a shorter run than the one stored is another run
    if differing:
        changes = ", ".join(f"{k}: {was.get(k)!r} -> {now[k]!r}" for k in differing[:6])
        raise ValueError(
            f"{run_dir}: the {stage} stage stored there was trained with other settings ({changes}); "
            "resume it with the same configuration (a larger train.max_steps extends it), or train "
            "under a new --name"
        )
    if now["train.max_steps"] > was["train.max_steps"]:
        # Extending is allowed on purpose (a learning curve grows a run); it is not the run a fresh
        # start with that many steps would be, since the cosine had been planned to end earlier.
        print(
            f"stt.train: extending the {stage} stage from train.max_steps {was['train.max_steps']} to "
            f"{now['train.max_steps']}: from step {stored['step']} the cosine is re-planned to end there"
        )


def run_stage(spec: StageSpec, args: argparse.Namespace, run_dir: str, init: str, use_gpu: bool) -> str:
    """Train one stage as the Ray Train run `<run_dir>/<stage>`; returns the exported final checkpoint."""
    cfg, stage = spec.config, spec.name
    final = checkpoint.join(run_dir, f"{stage}-final.pt")
    check_resume_config(spec, run_dir)
    if checkpoint.exists(final):
        done = checkpoint.load(final)
        if done["stage"] == stage and done["step"] >= cfg.train.max_steps:
            if spec.fisher_batches and "fisher" not in done:
                raise ValueError(
                    f"{final}: the finished {stage} stage has no Fisher information, which "
                    f"train.recipe={cfg.train.recipe} needs; train it again under a new --name"
                )
            print(f"stt.train: {stage} stage already finished at step {done['step']} ({final}); skipping it")
            return final
    print(spec.describe_lr(args.workers))
    trainer = build_stage_trainer(
        spec,
        run_dir,
        init,
        use_gpu=use_gpu,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker
        or default_cpus_per_worker(args.workers, use_gpu, 0.0 if cfg.data.decode_in_worker else cfg.data.data_cpus),
        max_failures=args.max_failures,
        keep_checkpoints=args.keep_checkpoints,
        tensorboard=args.tensorboard,
        run_name=args.name,
    )
    result = check_stopped(trainer.fit())
    if result.checkpoint is None:
        raise RuntimeError(f"the {stage} stage reported no checkpoint (train.max_steps={cfg.train.max_steps})")
    export_final(result.checkpoint, final)
    print(f"stt.train: {stage} stage finished; final checkpoint {final}")
    return final


def start_ray(**init_kwargs) -> None:
    """`ray.init` for stt's command lines: join the cluster in RAY_ADDRESS, else start a local one.

    A local cluster gets a dashboard port chosen here, and every task and actor of the job is told it
    (RAY_API_SERVER_ADDRESS): Ray Train's placement-group cleaner asks the State API whether a stopped
    run's controller is gone, and with another Ray instance on the same machine (a second sweep, a
    test session) its auto-detection refuses to guess, so the placement groups of ASHA-stopped trials
    leaked and later trials waited forever for their workers.
    """
    # Ray's Train state API (the dashboard's Train runs) records nothing without this flag; the driver
    # reads it for `ray.init`, and the runtime_env below hands it to the Train controller actor.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # Ray Train gives a worker group 60 s to start; two workers importing torch on a loaded 2-core
    # machine took longer (a test failed only under load, issue 18). The controller reads it from here.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)
        return
    with socket.socket() as probe:  # a free port now; Ray retries the next ones if it is taken meanwhile
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env_vars = {
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
        "RAY_TRAIN_ENABLE_STATE_TRACKING": os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"],
    }
    ray.init(dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": env_vars}, **init_kwargs)


def default_cpus_per_worker(num_workers: int, use_gpu: bool, data_cpus: float) -> float:
    """One CPU per worker, or on a CPU-only cluster an equal share of what Ray Data leaves (it hangs
    if training holds every CPU)."""
    if use_gpu:
        return 1.0
    return min(1.0, (ray.cluster_resources().get("CPU", 1.0) - data_cpus) / num_workers)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stt.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray Train workers (one GPU each on GPU); the global batch and the lr grow with them",
    )
    parser.add_argument(
        "--stage",
        choices=(*STAGES, "all"),
        default="all",
        help="all: the stages of train.recipe in order (default recipe: spatial, then temporal initialised from it)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="train on CPUs even if the cluster has GPUs (default: GPUs when present)"
    )
    parser.add_argument("--max-steps", type=int, help="optimisation steps per stage (overrides train.max_steps)")
    parser.add_argument(
        "--storage", default="runs", help="local folder or s3:// URI for checkpoints and logs (default: ./runs)"
    )
    parser.add_argument("--name", default="stt", help="run name: <storage>/<name>/<stage>/; re-running with it resumes")
    parser.add_argument(
        "--init",
        default="",
        help="the earlier stage's checkpoint to start from (temporal stage: and to distil), or a published release "
        "(stt.published: STT authors', VFS, CRW, torchvision); with --stage all, each stage starts from the one before",
    )
    parser.add_argument(
        "--max-failures", type=int, default=3, help="restarts of a crashed worker group from its last checkpoint"
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="checkpoints kept per stage (the latest ones; 0 keeps every one, e.g. for a learning curve)",
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs reserved per training worker (default: 1, or on CPUs a share of what data.data_cpus leaves)",
    )
    parser.add_argument(
        "--tensorboard", help="TensorBoard folder (default: <storage>/<name>/tensorboard for local storage)"
    )
    parser.add_argument(
        "--table1-row",
        choices=list(TABLE1_ROWS),
        help="paper 001 Table 1: set the temporal objective of this row (over --config and overrides); "
        "the paper trains these with train.recipe=temporal",
    )
    parser.add_argument("--config", help="YAML file with config sections (train, data, model, spatial, temporal, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=32 temporal.beta=0")
    return parser


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Run the requested stages; returns {stage: final checkpoint path}."""
    args = command.parse_args(get_args_parser(), argv)
    cfg = load_config(args.config, args.overrides)
    if args.table1_row:
        cfg.temporal = table1_config(args.table1_row, cfg.temporal)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    check_worker_count(args.workers)
    if args.cpus_per_worker is not None and not (math.isfinite(args.cpus_per_worker) and args.cpus_per_worker > 0):
        raise UsageError(f"--cpus-per-worker: expected a positive number, got {args.cpus_per_worker}")
    if not cfg.data.root:
        from stt.data.synthetic import ensure_dataset

        cfg.data.root = str(ensure_dataset("ytvos"))
        print(
            f"stt.train: no data.root given: training on the embedded synthetic YouTube-VOS set {cfg.data.root}"
            + ("" if ray.is_initialized() or os.environ.get("RAY_ADDRESS") else " on a local Ray cluster")
        )
    specs = [stage_spec(cfg, stage) for stage in (recipe_of(cfg).stages if args.stage == "all" else (args.stage,))]
    run_dir = checkpoint.join(
        args.storage if checkpoint.is_uri(args.storage) else os.path.abspath(args.storage), args.name
    )
    # a Ray Train checkpoint folder stands for the checkpoint.pt it holds
    args.init = args.init and checkpoint.checkpoint_file(args.init, "--init")
    # before Ray starts: a typo costs a second, not a cluster start
    check_inputs(cfg, specs, args.init, run_dir, args.tensorboard)

    if not ray.is_initialized():
        start_ray()  # joins the cluster in RAY_ADDRESS, else starts a local one
    use_gpu = not args.cpu and ray.cluster_resources().get("GPU", 0) >= 1
    finals: dict[str, str] = {}
    init = args.init  # each stage of the recipe starts from (and the temporal one distils) the one before
    for spec in specs:
        finals[spec.name] = init = run_stage(spec, args, run_dir, init, use_gpu)
    return finals


def check_worker_count(workers: int, option: str = "--workers") -> None:
    """UsageError unless `workers` is at least 1 and, without a cluster (RAY_ADDRESS), at most the CPUs of this
    machine (of the local Ray, once started). `--workers 999` on 2 cores asked Ray for 999 workers of 0.001 CPU
    each and started 52 Python processes and more, saying nothing; a cluster's autoscaler may add nodes."""
    if workers < 1:
        raise UsageError(f"{option}: expected at least 1, got {workers}")
    if os.environ.get("RAY_ADDRESS"):
        return
    cpus = ray.cluster_resources().get("CPU", 0.0) if ray.is_initialized() else float(os.cpu_count() or 1)
    if workers > cpus:
        raise UsageError(
            f"{option} {workers}: this machine has {cpus:g} CPUs and no cluster is given; expected at most "
            f"{cpus:g} workers, one per CPU (or RAY_ADDRESS set to a cluster that has room for them)"
        )


def check_inputs(cfg: Config, specs: list[StageSpec], init: str, run_dir: str, tensorboard: str | None) -> None:
    """The data roots, the evaluation set, the --init file and the storage, checked before anything starts;
    the run folder and TensorBoard's kept apart from every input folder."""
    from stt.data.layouts import DAVIS, DatasetError

    resolve_source(cfg.data.root)
    if cfg.data.images and any("spatial" in spec.streams for spec in specs):
        resolve_source(cfg.data.images, images=True)
    evaluates = bool(cfg.train.eval_every or cfg.train.eval_steps)
    if evaluates and cfg.train.eval_davis_root:
        try:  # else found by the first evaluation, after Ray started and the first steps ran
            DAVIS(cfg.train.eval_davis_root, split=cfg.train.eval_davis_set)
        except DatasetError as error:
            raise DatasetError(f"train.eval_davis_root: {error}") from None
    inputs = {"data.root": cfg.data.root, "data.images": cfg.data.images}
    if evaluates:
        inputs["train.eval_davis_root"] = cfg.train.eval_davis_root
    # an image folder inside the run folder would train on its mask panels; a run inside the data, the reverse
    check_apart("--storage/--name", run_dir, inputs)
    if tensorboard:
        check_apart("--tensorboard", tensorboard, inputs)
    if init:  # read once here: a bad file is named before Ray starts
        checkpoint.load_init(init, f"--init {init}", cfg.model.arch)
    fs, path = checkpoint.filesystem(run_dir)
    try:
        checkpoint.contact(run_dir, lambda: fs.create_dir(path, recursive=True))
        if not checkpoint.is_uri(run_dir) and not os.access(path, os.W_OK):
            raise PermissionError(path)
    except StorageError:
        raise  # already one line naming the store (and a request that never answered ends the process)
    except OSError as error:
        raise PermissionError(
            f"--storage: cannot write the run folder {run_dir} ({' '.join(str(error).split())[:120]})"
        ) from None


if __name__ == "__main__":
    sys.exit(command.run(main, "stt.train"))
