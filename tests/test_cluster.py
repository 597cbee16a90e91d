"""cluster/: every cluster YAML passes Ray's own check (what `ray up` runs) and our invariants; and a
multi-node rehearsal on this machine (cluster/rehearse.py) trains across nodes that share nothing
but the shared folder."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CLUSTER_FILES = sorted(CLUSTER.glob("*.yaml"))
CLOUD_FILES = [path for path in CLUSTER_FILES if path.name != "local.yaml"]


def prepared(path: Path) -> dict:
    """The config as `ray up` sees it: Ray's defaults merged in, then Ray's schema and sanity checks."""
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def pinned_versions() -> dict[str, str]:
    """{package: version} of the `==` pins in pyproject.toml's dependencies (extras dropped)."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = (re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*])?==([^;\s]+)", d.strip()) for d in dependencies)
    return {m.group(1).lower(): m.group(2) for m in pins if m}


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def test_there_is_a_gpu_cluster_and_a_rehearsal_cluster():
    assert {"gpu.yaml", "local.yaml"} <= {path.name for path in CLUSTER_FILES}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_accepts_the_cluster_file(path):
    config = prepared(path)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_dashboard_is_bound_to_loopback_only(path):
    """Ray's AWS defaults start the head with --dashboard-host=0.0.0.0: a file that leaves its start
    commands to the defaults inherits it, so this checks the merged config."""
    commands = start_commands(prepared(path))
    hosts = [h for command in commands for h in re.findall(r"--dashboard-host[= ](\S+)", command)]
    assert hosts == ["127.0.0.1"], (
        f"{path.name}: expected one --dashboard-host=127.0.0.1 in the head start command, got {hosts}"
    )
    assert not any("0.0.0.0" in command for command in commands)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_no_default_setup_command_sneaks_in(path):
    """Ray's defaults install a nightly wheel from the web when setup_commands is left out."""
    config = prepared(path)
    commands = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
    assert not any("://" in command for command in commands), commands


def every_command(config: dict) -> list[str]:
    """Every shell command of a prepared config: top-level and per-node-type initialisation, setup and start."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    commands = [c for key in keys for c in config.get(key, [])] + start_commands(config)
    for node_type in config["available_node_types"].values():
        commands += node_type.get("initialization_commands", [])
    return commands


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda p: p.name)
def test_prometheus_listens_on_loopback_only(path):
    """Issue 28: Ray 2.60's `ray metrics launch-prometheus` starts Prometheus on its default address, every
    interface, with --web.enable-lifecycle (remote shutdown and reload), while docs/cluster.md said 127.0.0.1."""
    commands = every_command(prepared(path))
    assert not any("launch-prometheus" in command for command in commands)
    (prometheus,) = [command for command in commands if "prom/prometheus" in command]
    words = shlex.split(prometheus)
    assert "--web.listen-address=127.0.0.1:9090" in words and "--web.enable-lifecycle" not in words
    assert "--config.file=/tmp/ray/prometheus.yml" in words
    # the configuration the head writes for it: valid YAML, scraping what Ray's service discovery lists
    (written,) = [command for command in commands if "tee /tmp/ray/prometheus.yml" in command]
    scrape = yaml.safe_load(shlex.split(written)[1].replace("\\n", "\n"))["scrape_configs"]
    assert scrape == [
        {"job_name": "ray", "file_sd_configs": [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]}
    ]


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda p: p.name)
def test_a_gpu_worker_type_autoscales_from_zero(path):
    config = prepared(path)
    gpu_types = {
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
        and re.search(r"^(g[4-6]|p[3-5])", spec["node_config"].get("InstanceType", ""))
    }
    assert gpu_types, f"{path.name}: no worker type with a GPU instance"
    assert all(spec["min_workers"] == 0 and spec["max_workers"] >= 1 for spec in gpu_types.values())
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert (
        config["available_node_types"][config["head_node_type"]]["resources"].get("CPU") == 0
    )  # the head never trains


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda p: p.name)
def test_storage_is_remote_and_the_token_travels(path):
    config = prepared(path)
    options = " ".join(config["docker"]["run_options"])
    storage = re.search(r"--env STT_STORAGE=(\S+)", options)
    assert storage and storage.group(1).startswith(("s3://", "gs://")), (
        f"{path.name}: STT_STORAGE must be an object-store URI"
    )
    assert "--env RAY_AUTH_MODE=token" in options
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert config["file_mounts"].get("~/stt") == "."  # the checkout itself: setup_commands installs it


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda p: p.name)
def test_versions_match_pyproject(path):
    config = prepared(path)
    pins = pinned_versions()
    images = [config["docker"][key] for key in ("image", "head_image", "worker_image") if key in config["docker"]]
    assert images and all(
        re.fullmatch(rf"rayproject/ray:{re.escape(pins['ray'])}-py3\d+-(gpu|cu\d+)", image) for image in images
    ), images
    installed = {}
    for command in config["setup_commands"]:
        for word in shlex.split(command):
            if "==" in word:
                name, version = word.split("==")
                installed[name.lower()] = version
    assert installed == {"torch": pins["torch"], "torchvision": pins["torchvision"]}
    assert "pip install --no-cache-dir -e ~/stt" in config["setup_commands"]


def test_pinned_versions_are_read_from_pyproject():
    pins = pinned_versions()
    assert pins["ray"] == "2.60.0" and pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_the_invariants_catch_a_public_dashboard_and_a_local_store(tmp_path):
    """The checks above fail on the mistakes they exist for."""
    config = yaml.safe_load((CLUSTER / "gpu.yaml").read_text())
    del config["head_start_ray_commands"]  # Ray's default: --dashboard-host=0.0.0.0
    config["docker"]["run_options"] = [o.replace("s3://", "/home/ubuntu/") for o in config["docker"]["run_options"]]
    broken = tmp_path / "gpu.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(AssertionError, match="127.0.0.1"):
        test_dashboard_is_bound_to_loopback_only(broken)
    with pytest.raises(AssertionError, match="object-store URI"):
        test_storage_is_remote_and_the_token_travels(broken)


# ----------------------------------------------------------------------------------------- rehearsal
@pytest.mark.slow
def test_rehearsal_trains_across_isolated_nodes(tmp_path):
    """cluster/rehearse.py in its own process (its own Ray cluster, not the session's): the spatial stage
    with two 1.5-CPU workers on a 0-CPU head and three 2-CPU nodes. The script asserts the placement and the
    checkpoints itself; this re-reads what it wrote."""
    run = subprocess.run(
        [
            sys.executable,
            str(CLUSTER / "rehearse.py"),
            "--out",
            str(tmp_path),
            "--stage",
            "spatial",
            "--skip-sweep",
            "--job-timeout",
            "400",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "rehearsal.json").read_text())
    assert report["nodes"] == 4
    workers = report["train_placement"]["RayTrainWorker"]
    assert len(workers) == 2 and report["head_node"] not in workers
    assert [Path(p).name for p in report["checkpoints"]] == ["spatial-final.pt"]
    assert Path(report["checkpoints"][0]).is_relative_to(tmp_path / "shared")
