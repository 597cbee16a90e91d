"""What a person watching a run sees: the `stt_train_*` gauges (names and tags), the stt Grafana
dashboard's queries against those names, Ray's Train state API listing a real stt.train run, the
propagated-mask panel in TensorBoard, and the progress lines' elapsed time and ETA, redrawn in place on
a terminal and sparse elsewhere."""

from __future__ import annotations

import io
import json
import re
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from stt.losses import TERMS
from stt.observe import Progress, eta_seconds, format_duration, mask_panel, progress_text, rate_text, with_progress
from stt.train import MetricsLogger

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "cluster" / "grafana" / "stt_dashboard.json"

# Every number train_loop_per_worker reports: the loss dict's keys (stt.losses / stt.recipes),
# WindowMeter.summary's two rates, and the bookkeeping train_loop_per_worker adds itself.
REPORTED = (
    *TERMS,
    "loss",
    "penalty",
    "nce",
    "pairs_per_s",
    "data_wait_fraction",
    "step",
    "lr",
    "start_step",
    "skipped_frames",
    "accuracy",
    "J&F",
)


class RecordingGauge:
    made: dict[str, "RecordingGauge"] = {}

    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.values = name, tuple(tag_keys), []
        RecordingGauge.made[name] = self

    def set(self, value, tags=None):
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.values.append((value, dict(tags)))


@pytest.fixture
def gauges(monkeypatch):
    import ray.util.metrics

    RecordingGauge.made = {}
    monkeypatch.setattr(ray.util.metrics, "Gauge", RecordingGauge)
    return RecordingGauge.made


def exported_names(gauges) -> set[str]:
    """Prometheus names of the gauges MetricsLogger makes for one report of every number stt reports
    (Ray's exporter puts "ray_" before an application metric's name)."""
    logger = MetricsLogger(None, run="r", stage="temporal", trial="t1")
    logger.after_report(None, [{name: 0.5 for name in REPORTED} | {"step": 3}], None)
    return {"ray_" + name for name in gauges}


def test_gauges_are_tagged_with_run_stage_and_trial(gauges):
    logger = MetricsLogger(None, run="paper", stage="spatial")
    logger.after_report(None, [{"step": 7, "loss": 1.25, "J&F": 0.5, "flag": True, "note": "x"}], None)
    assert set(gauges) == {"stt_train_step", "stt_train_loss", "stt_train_J_F"}  # no bools, no strings
    assert gauges["stt_train_loss"].values == [(1.25, {"run": "paper", "stage": "spatial", "trial": ""})]
    MetricsLogger(None, run="sweep", stage="temporal", trial="abc_00001").after_report(
        None, [{"step": 2, "loss": 2.0}], None
    )
    assert gauges["stt_train_loss"].values[-1] == (2.0, {"run": "sweep", "stage": "temporal", "trial": "abc_00001"})


def test_every_dashboard_panel_queries_an_exported_metric(gauges):
    exported = exported_names(gauges)
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], f"{DASHBOARD.name}: panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = set(re.findall(r"\b(ray_stt_train_\w+)", target["expr"]))
            assert names, f"{DASHBOARD.name}: panel {panel['title']!r} queries no stt metric: {target['expr']}"
            assert names <= exported, (
                f"{DASHBOARD.name}: panel {panel['title']!r} queries {names - exported}, not exported"
            )
            assert re.search(r'run=~"\$run".*stage=~"\$stage".*trial=~"\$trial"', target["expr"])
            queried |= names
    for variable in dashboard["templating"]["list"][1:]:
        assert set(re.findall(r"ray_stt_train_\w+", variable["definition"])) <= exported
    # what the issue asks the dashboard to show
    wanted = {
        "ray_stt_train_" + n
        for n in (
            "loss",
            "rec_res3",
            "rec_res4",
            "lc",
            "gc",
            "J_F",
            "pairs_per_s",
            "data_wait_fraction",
            "kept_fraction",
            "lr",
        )
    }
    assert wanted <= queried, wanted - queried


def test_the_gpu_cluster_tracks_train_state_and_provisions_the_dashboard():
    import yaml

    config = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    assert "--env RAY_TRAIN_ENABLE_STATE_TRACKING=1" in config["docker"]["run_options"]
    head = " ".join(config["head_start_ray_commands"])
    assert "prom/prometheus" in " ".join(config["available_node_types"]["head"]["initialization_commands"])
    assert "cluster/grafana/stt_dashboard.json /tmp/ray/session_latest/metrics/grafana/dashboards/" in head
    grafana = " ".join(config["available_node_types"]["head"]["initialization_commands"])
    assert "GF_PATHS_CONFIG=/tmp/ray/session_latest/metrics/grafana/grafana.ini" in grafana
    assert "GF_SERVER_HTTP_ADDR=127.0.0.1" in grafana  # loopback only, like the dashboard


def test_the_train_state_api_lists_a_tiny_run(ray_local, tmp_path):
    import ray

    from stt.data.synthetic import generate
    from stt.train import main

    data = generate(tmp_path / "data", preset="tiny", kinds=("ytvos",))
    main(
        [
            "--workers",
            "1",
            "--cpu",
            "--stage",
            "spatial",
            "--max-steps",
            "1",
            "--storage",
            str(tmp_path / "runs"),
            "--name",
            "watched",
            "--cpus-per-worker",
            "0.5",
            "model.arch=resnet18",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.checkpoint_every=1",
            "train.eval_every=0",
            "data.crop_size=64",
            "spatial.image_size=64",
            "spatial.queue_size=16",
            "spatial.bn_splits=2",
            f"data.root={data['ytvos']}",
        ]
    )
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    url = f"http://{ray._private.worker.get_dashboard_url()}/api/train/v2/runs/v1"
    request = urllib.request.Request(url, headers=get_auth_headers_if_auth_enabled({}))  # local Ray has token auth on
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read())["train_runs"]
    ours = [run for run in runs if run["name"] == "spatial"]
    assert ours, [run["name"] for run in runs]
    assert ours[0]["status"] == "FINISHED"


def test_optuna_dashboard_serves_a_study(tmp_path):
    """The command tune/sweep.py prints, on a tiny study: its API lists the study and its trials."""
    import shutil
    import socket
    import subprocess
    import sys
    import time

    import optuna

    executable = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    if not Path(executable).exists():
        pytest.skip("optuna-dashboard is not installed (pip install -e '.[dashboard]')")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="training", storage=storage, direction="maximize")
    for x in (0.25, 0.75):
        study.enqueue_trial({"x": x})
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [executable, storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["training"]
        study_id = studies[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=5) as response:
            trials = json.loads(response.read())["trials"]
        assert sorted(t["params"][0]["param_internal_value"] for t in trials) == [0.25, 0.75]
        assert all(t["state"] == "Complete" for t in trials) and sorted(t["values"][0] for t in trials) == [0.25, 0.75]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_prometheus_scrapes_the_stt_gauges_of_a_tiny_run(ray_local, tmp_path):
    """Debian's `prometheus` scraping the local Ray node's metrics port while stt.train runs: the
    series are real, with their tags, not only gauges made in a process."""
    import shutil
    import socket
    import subprocess
    import time
    import urllib.parse

    import ray

    from stt.data.synthetic import generate
    from stt.train import main

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install prometheus)")
    target = f"127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}"
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def query(expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())["data"]["result"]

    try:
        data = generate(tmp_path / "data", preset="tiny", kinds=("ytvos",))
        main(
            [
                "--workers",
                "1",
                "--cpu",
                "--stage",
                "spatial",
                "--max-steps",
                "8",
                "--storage",
                str(tmp_path / "runs"),
                "--name",
                "scraped",
                "--cpus-per-worker",
                "0.5",
                "model.arch=resnet18",
                "train.batch_size=4",
                "train.warmup_steps=1",
                "train.log_every=1",
                "train.checkpoint_every=8",
                "train.eval_every=0",
                "data.crop_size=64",
                "spatial.image_size=64",
                "spatial.queue_size=16",
                "spatial.bn_splits=2",
                f"data.root={data['ytvos']}",
            ]
        )
        deadline = time.monotonic() + 30  # the last report reaches Prometheus within Ray's export interval
        while True:
            # last_over_time: the run is over and its series may have gone stale already
            found = {
                name: query(f'last_over_time(ray_stt_train_{name}{{run="scraped"}}[1h])')
                for name in ("loss", "pairs_per_s", "step")
            }
            if all(found.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert all(found.values()), f"Prometheus holds no stt_train series for the run: {found}"
        for series in found.values():
            # Prometheus stores an empty label as no label: a run outside a sweep has no `trial`
            assert series[0]["metric"]["stage"] == "spatial" and series[0]["metric"].get("trial", "") == "", series
        assert float(found["loss"][0]["value"][1]) > 0 and float(found["pairs_per_s"][0]["value"][1]) > 0
        assert 1 <= float(found["step"][0]["value"][1]) <= 8
    finally:
        server.terminate()
        server.wait(timeout=30)


# ----------------------------------------------------------------------------------------- progress and TensorBoard
def test_progress_text_gives_elapsed_time_and_an_eta_without_the_first_step():
    assert [format_duration(s) for s in (0, 42.4, 185, 7380, 100800)] == ["0s", "42s", "3m05s", "2h03m", "1d04h"]
    assert eta_seconds(0, 10, 5.0) is None and progress_text(0, 10, 5.0) == "elapsed 5s  eta ?"
    assert eta_seconds(1, 10, 4.0, first_s=4.0) == 36.0  # one step: it is all there is to go by
    # 4 steps in 34 s, the first (warm-up) 10 s of it: 8 s a step from then on, 6 steps to go
    assert eta_seconds(4, 10, 34.0, first_s=10.0) == 48.0
    assert eta_seconds(4, 10, 34.0) == 34.0 / 4 * 6
    assert progress_text(4, 10, 34.0, first_s=10.0) == "elapsed 34s  eta 48s"
    assert progress_text(10, 10, 3725.0, first_s=1.0) == "elapsed 1h02m  eta 0s"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rate_text_gives_units_a_second_or_the_time_a_unit_takes():
    assert rate_text(50, 4.0, "frame") == "12.5 frame/s"
    assert rate_text(4, 10.0, "seq") == "2.5s/seq"
    assert rate_text(2, 370.0, "shard") == "3m05s/shard"
    assert rate_text(0, 3.0, "seq") == "? seq/s"


def test_progress_off_a_terminal_prints_a_line_a_minute_with_an_eta_and_the_last_one():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(10, "davis", "seq", stream=stream, every_s=60.0, clock=clock)
    for index in range(10):
        clock.now += 25.0  # a sequence every 25 s
        progress.advance(f"s{index}")
    progress.close()
    # a line once a minute has passed since the last (75, 150 and 225 s), and one for the last sequence;
    # eta: 25 s for each sequence left
    assert stream.getvalue().splitlines() == [
        "davis 3/10 seq (30%)  25s/seq  elapsed 1m15s  eta 2m55s  s2",
        "davis 6/10 seq (60%)  25s/seq  elapsed 2m30s  eta 1m40s  s5",
        "davis 9/10 seq (90%)  25s/seq  elapsed 3m45s  eta 25s  s8",
        "davis 10/10 seq (100%)  25s/seq  elapsed 4m10s  eta 0s  s9",
    ]


def test_progress_on_a_terminal_redraws_one_line_in_place_within_its_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")  # shutil.get_terminal_size reads it first
    stream, clock = FakeTerminal(), FakeClock()
    progress = Progress(3, "vip", "video", stream=stream, clock=clock)
    for name in ("a", "b", "a-video-with-a-long-name"):
        clock.now += 2.0
        progress.advance(name)
    lines = [
        "vip 1/3 video (33%)  2s/video  elapsed 2s  eta 4s  a",
        "vip 2/3 video (66%)  2s/video  elapsed 4s  eta 2s  b",
        "vip 3/3 video (100%)  2s/video  elapsed 6s  eta 0s  a-video-with-a-long-name",
    ]
    # "\r" back to the line's start, the text cut to the terminal's width less one, "\x1b[K" clears what is left
    assert stream.getvalue() == "".join(f"\r{line[:49]}\x1b[K" for line in lines) + "\n"

    stream = FakeTerminal()
    for name in with_progress(["a", "b", "c"], "davis", "seq", name=str, stream=stream):
        if name == "b":
            break  # an error or a break ends the line, so what is printed next starts a fresh one
    assert stream.getvalue().count("\r") == 1 and stream.getvalue().endswith("\x1b[K\n")

    stream = FakeTerminal()
    assert list(with_progress([1, 2], "davis", "seq", enabled=False, stream=stream)) == [1, 2]
    assert stream.getvalue() == ""


def test_evaluate_and_prepare_print_no_bar_garbage_when_captured(tmp_path, capsys):
    """pytest's capture is not a terminal, like a log file: stdout holds the results alone, stderr one
    progress line per loop, and neither a carriage return nor a terminal escape."""
    from stt.data import prepare
    from stt.data.layouts import DAVIS
    from stt.data.synthetic import generate
    from stt.evaluate import main
    from stt.metrics import DAVIS_SUMMARY_KEYS

    data = generate(tmp_path / "data", preset="tiny", kinds=("davis", "ytvos"))
    capsys.readouterr()
    report = main(
        [
            "davis",
            "--davis-root",
            str(data["davis"]),
            "--checkpoint",
            "lab:8",
            "--out",
            str(tmp_path / "out"),
            "--feature-cache",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert not re.search(r"[\r\x1b]", captured.out + captured.err)
    table = captured.out.splitlines()
    assert table[0].split() == list(DAVIS_SUMMARY_KEYS) and len(table) == 3 + len(report["rows"])
    sequences = DAVIS(data["davis"]).sequences
    count = len(sequences)
    rate = r"(\S+ seq/s|\S+/seq)"
    assert re.fullmatch(
        rf"davis {count}/{count} seq \(100%\)  {rate}  elapsed (?:\d+m)?\d+s  eta 0s  {sequences[-1]}\n", captured.err
    ), captured.err

    settings = prepare.Settings("ytvos", frames_per_row_group=8, row_groups_per_shard=1)
    manifest = prepare.prepare("ytvos", data["ytvos"], str(tmp_path / "shards"), settings, workers=2)
    captured = capsys.readouterr()
    shards = len(manifest["shards"])
    assert shards > 1 and not re.search(r"[\r\x1b]", captured.out + captured.err)
    assert captured.out.startswith(f"stt.prepare: {tmp_path / 'shards'}: {shards} shard(s) written")
    rate = r"(\S+ shard/s|\S+/shard)"
    assert re.fullmatch(
        rf"stt.prepare {shards}/{shards} shard \(100%\)  {rate}  elapsed (?:\d+m)?\d+s  eta 0s\n", captured.err
    ), captured.err


def test_the_mask_panel_shows_frame_prediction_and_truth_per_chosen_frame():
    frames = np.full((9, 40, 60, 3), 200, np.uint8)
    truth = np.zeros((9, 40, 60), np.uint8)
    truth[:, 10:30, 20:40] = 1
    predicted = np.zeros_like(truth)
    palette = [0, 0, 0, 255, 0, 0] + [0] * 762
    panel = mask_panel(frames, predicted, truth, palette, rows=4, tile_height=20)
    assert panel.shape == (4 * 20, 3 * 30, 3) and panel.dtype == np.uint8
    tile = panel[:20]
    assert (tile[:, :30] == 200).all() and (tile[:, 30:60] == 200).all()  # frame; an empty prediction leaves it
    assert tuple(tile[10, 75]) == (228, 100, 100)  # the truth's object blended 50 % in its palette colour


def tensorboard_events(folder: Path):
    """Every event in the TensorBoard files under `folder` (TFRecord: length, crc, Event, crc), read
    with tensorboardX's protobufs (the `tensorboard` package is not a dependency)."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            yield Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4


def test_tensorboard_shows_the_propagated_masks_of_each_evaluation(ray_local, tmp_path):
    from PIL import Image

    from stt.data.synthetic import generate
    from stt.train import main

    data = generate(tmp_path / "data", preset="tiny", kinds=("ytvos", "davis"))
    main(
        [
            "--workers",
            "1",
            "--cpu",
            "--stage",
            "spatial",
            "--max-steps",
            "2",
            "--storage",
            str(tmp_path / "runs"),
            "--name",
            "pictured",
            "--cpus-per-worker",
            "0.5",
            "model.arch=resnet18",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.checkpoint_every=1",
            "train.eval_every=2",
            "data.crop_size=64",
            "spatial.image_size=64",
            "spatial.queue_size=16",
            "spatial.bn_splits=2",
            f"data.root={data['ytvos']}",
            f"train.eval_davis_root={data['davis']}",
        ]
    )
    events = list(tensorboard_events(tmp_path / "runs" / "pictured" / "tensorboard"))
    images = [(event.step, value) for event in events for value in event.summary.value if value.HasField("image")]
    assert [(step, value.tag) for step, value in images] == [(2, "spatial/davis_masks")]  # step 1 was not evaluated
    image = images[0][1].image
    panel = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert (
        panel.shape == (image.height, image.width, 3) and image.width == 3 * (image.width // 3) and image.height >= 96
    )
    scalars = {value.tag for event in events for value in event.summary.value if value.HasField("simple_value")}
    assert {"spatial/J_F", "spatial/loss"} <= scalars  # tensorboardX writes "&" as "_"


def test_trial_progress_counts_a_phases_finished_trials_with_an_eta(ray_local, tmp_path, capsys):
    from ray import tune

    from stt.observe import TrialProgress

    def trainable(config):
        tune.report({"x": config["x"]})

    tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([1, 2, 3])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[TrialProgress("training", 3)]),
    ).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sweep: training trials")]
    assert len(lines) == 3, lines
    for done, line in enumerate(lines, 1):
        assert re.fullmatch(
            rf"sweep: training trials {done}/3 done \(\w+ finished\)  elapsed (?:\d+m)?\d\d?s  eta \d+(m\d\ds|s)", line
        ), line
    assert lines[-1].endswith("eta 0s")


def test_trial_progress_counts_trials_a_resumed_phase_had_finished():
    from types import SimpleNamespace

    from stt.observe import TrialProgress

    trials = [
        SimpleNamespace(trial_id=f"t{i}", status=status)
        for i, status in enumerate(("TERMINATED", "TERMINATED", "ERROR", "RUNNING", "PENDING"))
    ]
    progress = TrialProgress("propagation", 5)
    progress.setup()
    assert re.fullmatch(
        r"sweep: propagation trials 4/5 done \(t3 finished\)  elapsed \d+s  eta \d+s",
        progress.line(trials, trials[3], "finished"),
    )
    trials[3].status = "TERMINATED"
    assert progress.line(trials, trials[4], "failed").startswith("sweep: propagation trials 5/5 done (t4 failed)")
    assert progress.line(trials, trials[4], "failed").endswith("eta 0s")
