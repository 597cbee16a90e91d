"""python cluster/rehearse.py: the multi-node rehearsal of cluster/gpu.yaml, on one machine.

    python cluster/rehearse.py [--out DIR] [--stage all|spatial] [--skip-sweep]

Starts the four-node cluster of cluster/local.yaml (a 0-CPU head and three 2-CPU worker nodes, each
its own `ray start`), then submits through the Jobs API, exactly as docs/cluster.md does on AWS:
 1. `python -m stt.train --workers 2 --stage all` (2 steps a stage, tiny crops): two training
    workers of 1.5 CPUs that cannot share a node (`--stage spatial`: the first stage only, what CI runs);
 2. `python tune/sweep.py --quick` shrunk to 2 training and 2 propagation trials.
Storage and data live in OUT/shared (standing in for S3 / EFS); each driver runs in
OUT/driver-private, which every worker node sees as an empty tmpfs (its own mount namespace, where
`unshare` is allowed), so a path that exists only on the driver's node fails as it would on
separate machines. After each job it asserts from Ray's own records (the actors of the job and the
nodes they ran on) that the work spanned several worker nodes and never the head, and from the
outputs that the run finished. Writes OUT/rehearsal.json; exits non-zero on any failure. The
cluster is torn down in every case, by stopping only the processes this script started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = REPO / "cluster" / "local.yaml"
# The smallest runs that still exercise every part: tiny crops, 2-pair batches, no periodic J&F.
TINY_SWEEP = [
    "data.crop_size=32",
    "train.batch_size=2",
    "spatial.image_size=32",
    "spatial.queue_size=16",
    "spatial.bn_splits=1",
    "train.warmup_steps=1",
]
TINY_TRAIN = [*TINY_SWEEP, "train.checkpoint_every=2", "train.log_every=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mount_namespace_prefix() -> list[str]:
    """The `unshare` command that gives a process its own mount namespace, or [] where none is allowed."""
    for prefix in (
        ["unshare", "--mount", "--propagation", "private"],
        ["unshare", "--mount", "--propagation", "private", "--map-root-user"],
    ):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (FileNotFoundError, subprocess.TimeoutExpired):
            break
    return []


class LocalCluster:
    """The nodes of cluster/local.yaml as child processes; `stop()` ends exactly those."""

    def __init__(self, out: Path, driver_private: Path, token_file: Path):
        spec = yaml.safe_load(CLUSTER_FILE.read_text())
        self.head_commands, self.worker_commands = spec["head_start_ray_commands"], spec["worker_start_ray_commands"]
        self.num_workers = len(spec["provider"]["worker_ips"])
        self.logs, self.driver_private = out / "node-logs", driver_private
        self.logs.mkdir(parents=True, exist_ok=True)
        # Unix sockets live under the Ray temp folder: it must be short, so not under OUT.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="stt-r-", dir="/tmp"))
        self.ports = {"STT_GCS_PORT": free_port(), "STT_DASHBOARD_PORT": free_port(), "STT_CLIENT_PORT": free_port()}
        self.dashboard = f"http://127.0.0.1:{self.ports['STT_DASHBOARD_PORT']}"
        self.isolation = mount_namespace_prefix()
        self.processes: list[subprocess.Popen] = []
        self.token_file = token_file

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # never join another cluster
        env.update(auth_env(self.token_file))
        env.update(
            {k: str(v) for k, v in self.ports.items()},
            STT_RAY_TEMP=str(self.ray_temp),
            RAY_HEAD_IP="127.0.0.1",
            STT_DRIVER_PRIVATE=str(self.driver_private),
            PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        )
        return env

    def _launch(self, name: str, command: str, isolated: bool) -> None:
        if isolated:  # the driver's private folder becomes an empty tmpfs, in this node's namespace only
            argv = [
                *self.isolation,
                "sh",
                "-c",
                f'mount -t tmpfs stt-node-private "$STT_DRIVER_PRIVATE" && exec {command}',
            ]
        else:
            argv = ["sh", "-c", f"exec {command}"]
        env = {**self.env(), "STT_AGENT_PORT": str(free_port())}
        with open(self.logs / f"{name}.log", "w") as log:
            # Its own session: stop() signals this node's whole process group and nothing else.
            self.processes.append(
                subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def start(self, timeout_s: float = 120) -> None:
        for i, command in enumerate(self.head_commands):
            self._launch(f"head-{i}", command, isolated=False)
        self.wait_for_nodes(1, timeout_s)
        for n in range(self.num_workers):  # one at a time: raylets registering together time out on 2 busy cores
            for i, command in enumerate(self.worker_commands):
                self._launch(f"worker{n}-{i}", command, isolated=bool(self.isolation))
            self.wait_for_nodes(2 + n, timeout_s)

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [
            n
            for n in list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False)
            if n["state"] == "ALIVE"
        ]

    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline, last_error = time.monotonic() + timeout_s, None
        while True:
            dead = [p.args for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a node exited while starting: {dead}; logs in {self.logs}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except Exception as error:  # the dashboard is not up yet
                last_error = error
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{count} nodes not alive after {timeout_s:.0f} s (last error: {last_error}); logs in {self.logs}"
                )
            time.sleep(1)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
        for process in self.processes:
            try:
                process.wait(timeout=60)  # a node drains for up to 30 s first
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.ray_temp, ignore_errors=True)


def auth_env(token_file: Path) -> dict[str, str]:
    """Token authentication on, as on the GPU cluster: what every node and every client of the cluster needs."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def run_job(dashboard: str, entrypoint: str, log: Path, timeout_s: float) -> str:
    """Submit `entrypoint` through the Jobs API (as `ray job submit`), wait, save its log; returns the Ray job id."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + 120
    while True:  # the head's agent, which runs job drivers, may still be starting
        try:
            submission = client.submit_job(entrypoint=entrypoint)
            break
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(submission)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        if time.monotonic() > deadline:
            client.stop_job(submission)
            break
        time.sleep(2)
    log.write_text(client.get_job_logs(submission))
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job `{entrypoint}` ended {status} (timeout {timeout_s:.0f} s); its log: {log}")
    return client.get_job_info(submission).job_id


def nodes_by_actor_class(dashboard: str, job_id: str) -> dict[str, list[str]]:
    """{actor class: sorted node ids} of every actor the job created, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10_000, raise_on_missing_output=False
    )
    found: dict[str, set[str]] = defaultdict(set)
    for actor in actors:
        if actor.get("node_id"):
            found[actor["class_name"]].add(actor["node_id"])
    return {name: sorted(nodes) for name, nodes in found.items()}


def check_spread(what: str, placement: dict[str, list[str]], actor_class: str, head: str) -> None:
    """`actor_class` ran on at least two nodes, and no actor of the job that needs a CPU ran on the head."""
    nodes = placement.get(actor_class, [])
    if len(nodes) < 2:
        raise AssertionError(
            f"{what}: {actor_class} actors ran on {len(nodes)} node(s), expected at least 2: {placement}"
        )
    if head in nodes:
        raise AssertionError(f"{what}: {actor_class} ran on the 0-CPU head node {head}: {placement}")


def rehearse(out: Path, stage: str, skip_sweep: bool, timeout_s: float) -> dict:
    out = out.resolve()
    shared, private = out / "shared", out / "driver-private"
    private.mkdir(parents=True, exist_ok=True)
    token_file = out / "auth_token"  # a fresh token for this rehearsal only
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    os.environ.update(auth_env(token_file))  # this script is a client of the cluster: set before Ray is imported

    from stt import checkpoint
    from stt.data.synthetic import generate

    started = time.perf_counter()
    data = generate(shared / "data", preset="tiny", kinds=("ytvos", "davis"))  # "S3 / EFS": seen by every node
    report: dict = {"out": str(out), "seconds": {}}
    cluster = LocalCluster(out, private, token_file)
    try:
        t = time.perf_counter()
        cluster.start()
        report["seconds"]["cluster_start"] = round(time.perf_counter() - t, 1)
        nodes = cluster.alive_nodes()
        head = next(n["node_id"] for n in nodes if n["is_head_node"])
        report.update(nodes=len(nodes), head_node=head, worker_nodes_isolated=bool(cluster.isolation))
        python = sys.executable
        cd = f"cd {private} &&"  # relative paths would land in the driver's private folder

        t = time.perf_counter()
        job = run_job(
            cluster.dashboard,
            f"{cd} {python} -m stt.train --workers 2 --cpu --cpus-per-worker 1.5 --stage {stage} "
            f"--max-steps 2 --storage {shared / 'runs'} --name rehearsal data.root={data['ytvos']} "
            f"train.eval_every=0 {' '.join(TINY_TRAIN)}",
            out / "train-job.log",
            timeout_s,
        )
        report["seconds"]["train"] = round(time.perf_counter() - t, 1)
        report["train_placement"] = nodes_by_actor_class(cluster.dashboard, job)
        check_spread("stt.train", report["train_placement"], "RayTrainWorker", head)
        for trained in ("spatial", "temporal") if stage == "all" else (stage,):
            final = shared / "runs" / "rehearsal" / f"{trained}-final.pt"
            payload = checkpoint.load(final.read_bytes(), str(final))
            if payload["stage"] != trained or payload["step"] != 2:
                raise AssertionError(
                    f"{final}: expected the {trained} stage at step 2, got {payload['stage']} at {payload['step']}"
                )
            report.setdefault("checkpoints", []).append(str(final))

        if not skip_sweep:
            t = time.perf_counter()
            job = run_job(
                cluster.dashboard,
                f"{cd} {python} {REPO / 'tune' / 'sweep.py'} --quick --samples 2 "
                f"--propagation-samples 2 --cpu --storage {shared / 'sweeps'} --name rehearsal "
                f"--data-root {data['ytvos']} --davis-root {data['davis']} {' '.join(TINY_SWEEP)}",
                out / "sweep-job.log",
                timeout_s,
            )
            report["seconds"]["sweep"] = round(time.perf_counter() - t, 1)
            report["sweep_placement"] = nodes_by_actor_class(cluster.dashboard, job)
            check_spread("tune/sweep.py", report["sweep_placement"], "RayTrainWorker", head)
            state = json.loads((shared / "sweeps" / "rehearsal" / "state.json").read_text())
            report["sweep_reported_jf"] = state["final"]["reported_jf"]
    finally:
        cluster.stop()
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    (out / "rehearsal.json").write_text(json.dumps(report, indent=1))
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python cluster/rehearse.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="rehearsal", help="folder for shared storage, logs and rehearsal.json (default: ./rehearsal)"
    )
    parser.add_argument("--stage", choices=("all", "spatial"), default="all", help="stt.train stages to rehearse")
    parser.add_argument("--skip-sweep", action="store_true", help="rehearse stt.train only (what CI runs)")
    parser.add_argument("--job-timeout", type=float, default=900, help="seconds allowed to each job")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    report = rehearse(Path(args.out), args.stage, args.skip_sweep, args.job_timeout)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
