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

The driver reads like torchvision's references: `get_args_parser`, `main`; each stage is one Ray Train run
built by `build_stage_trainer` around stt.trainer's worker loop (`train_loop_per_worker`); every call into Ray is
marked `# Ray:`.

Learning rate: `train.batch_size` is per worker, so the global batch is batch_size x workers. Each
optimiser's rate is given for a reference global batch (`spatial.lr` for `spatial.lr_batch` images
with MoCo's SGD, used by the spatial and the joint stage; `temporal.lr` for `temporal.lr_batch` pairs
with Adam, the temporal stage; `vfs.lr` for `vfs.lr_batch` pairs with VFS's SGD) and scaled linearly to
the actual global batch, so the defaults give the paper's rates at the paper's batches (0.03 at 256
images; 1e-4 at 128 pairs) with no hand arithmetic. The effective rate is printed at the start of each
stage; it is warmed up linearly over `train.warmup_steps` and decayed to zero by a cosine at `train.max_steps`.

Metrics go to `ray.train.report` (stt.trainer), to TensorBoard under `<storage>/<name>/tensorboard` (local
storage; `--tensorboard DIR` otherwise) and, as Ray metrics named `stt_train_*`, to the Ray dashboard
(`MetricsLogger`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from stt import checkpoint, command, published
from stt.config import Config, load_config, to_dict
from stt.data.pipeline import STREAMS, SkippedFrames, check_cpu_budget
from stt.data.plans import resolve_source
from stt.errors import StorageError, UsageError
from stt.paths import check_apart
from stt.recipes import TABLE1_ROWS, StageSpec, recipe_of, stage_spec, table1_config
from stt.stages import STAGES, NonFiniteStep
from stt.stages.temporal import missing_teacher
from stt.trainer import MetricsLogger, train_loop_per_worker


# ----------------------------------------------------------------------------------------- orchestration
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

    `stream`: one of the stage's (stt.data.pipeline.STREAMS says what each holds); only the columns the stage
    reads of it travel. As many epochs as the steps need, each in its own order drawn from (seed, epoch). A stage
    reading several streams gives each an equal share of `data.data_cpus`. `skipped`: the run's corrupt-frame
    counter (a SkippedFrames actor).
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
    built = pipeline.stream_dataset(stream, data, cfg.spatial, vfs_cfg=cfg.vfs, **span)
    return built.dataset.select_columns(list(spec.stage.streams[stream]))


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
    if cfg.data.images and any(STREAMS[stream].images for stream in spec.streams):
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
    """One CPU per GPU worker. On a CPU-only cluster the CPUs are the compute: each worker gets an equal
    share of what Ray Data leaves (it hangs if training holds every CPU), at most one node's CPUs.

    A share of one CPU or more is rounded down to whole CPUs: Ray sets a worker's torch threads
    (OMP_NUM_THREADS) to the whole part, so 1.99 CPUs would compute on one thread while holding two.
    One worker on 2 cores steps 1.77x faster on both than on one (BENCHMARKS.md, "One worker on every CPU").
    """
    if use_gpu:
        return 1.0
    share = (ray.cluster_resources().get("CPU", 1.0) - data_cpus) / num_workers
    largest_node = max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"])
    share = min(share, largest_node)
    return float(math.floor(share)) if share >= 1.0 else share


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
        help="CPUs reserved per training worker, its torch threads on CPUs (default: 1 with GPUs; on CPUs an equal "
        "share of what data.data_cpus leaves, in whole CPUs from one up)",
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
    if cfg.data.images and any(STREAMS[stream].images for spec in specs for stream in spec.streams):
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
        published.load_init(init, f"--init {init}", cfg.model.arch)
    # the first stage starts from --init (each later one from the stage before it): its teacher, if it needs one
    if (missing := missing_teacher(specs[0], bool(init))) is not None:
        raise UsageError(missing)
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
