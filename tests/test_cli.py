"""Issue 18: every user error of every command line is one line naming the file or value and what was
expected, with a non-zero exit (2 for a usage error); the traceback only with --debug / STT_DEBUG."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from stt import checkpoint, command
from stt.config import Config, to_dict
from stt.data import prepare
from stt.data.layouts import DAVIS
from stt.data.synthetic import generate
from stt.evaluate import main as evaluate_main
from stt.train import check_resume_config
from stt.train import main as train_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0, kinds=("davis", "ytvos"))


def one_line_error(stderr, main, prog: str, argv: list[str]) -> tuple[int, str]:
    code = command.run(main, prog, argv)
    err = stderr().strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return code, err[0]


def checkpoint_file(tmp_path, kind: str):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "unknown-config-key":
        config = to_dict(Config())
        config["train"]["learning_speed"] = 3
        torch.save({"model": {}, "config": config, "stage": "temporal", "step": 1}, path)
    return path


@pytest.mark.parametrize(
    "kind, expected, code",
    [
        ("text", "not a torch.save file", 1),
        ("empty", "empty or cut short", 1),
        ("truncated", "damaged or cut-short zip archive", 1),
        ("unknown-config-key", "its stored config: unknown config key 'train.learning_speed'", 2),
    ],
)
def test_evaluate_names_a_bad_checkpoint_file(tiny, tmp_path, stderr, kind, expected, code):
    path = checkpoint_file(tmp_path, kind)
    argv = [
        "davis",
        "--davis-root",
        str(tiny["davis"]),
        "--checkpoint",
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    got, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert got == code and str(path) in line and expected in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "checkpoint, expected",
    [
        ("lab:x", "expected lab:STRIDE with a positive integer stride"),
        ("lab:0", "expected lab:STRIDE"),
        ("random:x", "expected random:SEED with an integer seed"),
    ],
)
def test_evaluate_names_a_bad_baseline(tiny, tmp_path, stderr, checkpoint, expected):
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--checkpoint", checkpoint, "--out", str(tmp_path / "out")]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert code == 2 and f"--checkpoint {checkpoint}" in line and expected in line


def test_a_checkpoint_file_named_like_a_baseline_is_read_as_a_file(tiny, tmp_path, stderr, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab_run.pt").write_text("not weights")
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--checkpoint", "lab_run.pt", "--out", str(tmp_path / "out")]
    _, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert "lab_run.pt: not a weights-only torch checkpoint" in line


@pytest.mark.parametrize(
    "override, expected",
    [
        ("eval.batch_size=0", "eval.batch_size: expected a positive value, got 0"),
        ("eval.layer=res9", "eval.layer: expected one of ('res3', 'res4', 'res5'), got 'res9'"),
        ("eval.max_short_side=-1", "eval.max_short_side: expected zero or more, got -1"),
        ("propagation.topk=0", "propagation.topk: expected a positive value, got 0"),
        ("propagation.bogus=1", "unknown config key 'propagation.bogus'"),
    ],
)
def test_evaluate_refuses_bad_settings_before_any_work(tiny, tmp_path, stderr, override, expected):
    argv = [
        "davis",
        "--davis-root",
        str(tiny["davis"]),
        "--checkpoint",
        "lab:8",
        "--out",
        str(tmp_path / "out"),
        override,
    ]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert code == 2 and expected in line


def test_yaml_syntax_error_names_the_file(tiny, tmp_path, stderr):
    config = tmp_path / "broken.yaml"
    config.write_text("propagation:\n  topk: [5\n")
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--config", str(config), "--out", str(tmp_path / "out")]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert code == 2 and f"{config}: not valid YAML" in line


def test_score_names_a_results_file_and_a_wrong_sized_mask(tiny, tmp_path, stderr):
    not_a_folder = tmp_path / "results.txt"
    not_a_folder.write_text("x")
    _, line = one_line_error(
        stderr,
        evaluate_main,
        "stt.evaluate",
        ["score", "--davis-root", str(tiny["davis"]), "--results", str(not_a_folder)],
    )
    assert f"--results {not_a_folder}: no such folder" in line

    dataset, results = DAVIS(tiny["davis"]), tmp_path / "results"
    for seq in dataset.sequences:
        (results / seq).mkdir(parents=True)
        for path in dataset.mask_paths(seq):
            Image.fromarray(np.zeros(dataset.first_mask(seq).shape, np.uint8), mode="L").save(results / seq / path.name)
    victim = results / dataset.sequences[-1] / dataset.mask_paths(dataset.sequences[-1])[1].name
    Image.fromarray(np.zeros((7, 9), np.uint8), mode="L").save(victim)
    _, line = one_line_error(
        stderr, evaluate_main, "stt.evaluate", ["score", "--davis-root", str(tiny["davis"]), "--results", str(results)]
    )
    assert f"{victim}: result mask is 9x7; expected" in line


def test_evaluate_refuses_a_first_mask_without_objects_before_writing(tiny, tmp_path, stderr):
    import shutil

    root = tmp_path / "davis"
    shutil.copytree(tiny["davis"], root)
    dataset = DAVIS(root)
    first = dataset.mask_paths(dataset.sequences[-1])[0]
    mask = np.asarray(Image.open(first)).copy()
    mask[mask > 0] = 255  # masks saved as 0/255: the object is void
    Image.fromarray(mask, mode="L").save(first)
    argv = ["davis", "--davis-root", str(root), "--checkpoint", "lab:8", "--out", str(tmp_path / "out")]
    _, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert f"{first}: the first annotation holds no object" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.crop_size=0", "data.crop_size: expected a positive multiple of 32, got 0"),
        ("train.batch_size=-1", "train.batch_size: expected a positive value, got -1"),
        ("temporal.entropy=bogus", "temporal.entropy: expected one of"),
    ],
)
def test_train_refuses_bad_settings_before_ray_starts(tmp_path, stderr, override, expected):
    code, line = one_line_error(stderr, train_main, "stt.train", ["--storage", str(tmp_path), override])
    assert code == 2 and expected in line and not (tmp_path / "stt").exists()


def test_prepare_refuses_options_out_of_range(tiny, tmp_path, stderr):
    for option, value in (("--short-side", "0"), ("--quality", "500")):
        code, line = one_line_error(
            stderr, prepare.main, "stt.prepare", ["ytvos", str(tiny["ytvos"]), str(tmp_path / "shards"), option, value]
        )
        assert f"{option}: expected an integer from" in line and f"got {value}" in line
        assert code == 2  # issue 28: a usage error, as README promises (it was 1)
    assert not (tmp_path / "shards").exists()


def test_a_conflicting_resume_is_refused_naming_the_keys(tmp_path):
    """Issue 18: re-running a finished stage with another lr kept the old model ("already finished")."""
    from stt.recipes import stage_spec

    stored = stage_spec(Config(), "temporal").config
    torch.save(
        {"model": {}, "config": to_dict(stored), "stage": "temporal", "step": 1000}, tmp_path / "temporal-final.pt"
    )
    check_resume_config(stage_spec(Config(), "temporal"), str(tmp_path))  # the same configuration resumes
    changed = Config()
    changed.temporal.lr, changed.data.crop_size, changed.train.log_every = 5e-4, 128, 1  # log_every changes no weights
    with pytest.raises(
        ValueError, match=r"trained with other settings \(temporal.lr: 0.0001 -> 0.0005, data.crop_size: 256 -> 128\)"
    ):
        check_resume_config(stage_spec(changed, "temporal"), str(tmp_path))
    shorter = Config()
    shorter.train.max_steps = 500
    with pytest.raises(ValueError, match="train.max_steps: 1000 -> 500"):
        check_resume_config(stage_spec(shorter, "temporal"), str(tmp_path))
    longer = Config()
    longer.train.max_steps = 2000  # extending a run is allowed, and said
    check_resume_config(stage_spec(longer, "temporal"), str(tmp_path))


def test_errors_inside_ray_workers_reach_the_driver_as_one_line(stderr, monkeypatch):
    from ray.train import WorkerGroupError

    def fails_in_a_worker(argv):
        raise WorkerGroupError(
            "rank 0 failed: <a long remote traceback>", {0: FileNotFoundError("data.root /nowhere: no such folder")}
        )

    assert command.run(fails_in_a_worker, "stt.train", []) == 1
    assert stderr() == "stt.train: error: data.root /nowhere: no such folder\n"
    monkeypatch.setenv("STT_DEBUG", "1")  # the traceback, for developers
    with pytest.raises(WorkerGroupError):
        command.run(fails_in_a_worker, "stt.train", [])


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise ZeroDivisionError("a bug, not a user error")

    with pytest.raises(ZeroDivisionError):
        command.run(buggy, "stt.train", [])


def test_evaluate_reads_a_checkpoint_through_a_uri(tmp_path):
    """Issue 15: --checkpoint takes what stt.checkpoint reads, e.g. s3://; file:// exercises the same
    pyarrow path here, and gives the same features (the same cache key) as the local path."""
    from stt.features import FeatureExtractor
    from stt.models import build_encoder
    from stt.recipes import stage_spec

    spec = stage_spec(Config(), "temporal")
    optimizer = torch.optim.Adam(build_encoder(spec.config.model).parameters())
    path = tmp_path / "temporal-final.pt"
    torch.save(
        checkpoint.payload(build_encoder(spec.config.model).state_dict(), spec.config, "temporal", 1, optimizer), path
    )
    local = FeatureExtractor(str(path), Config().model, Config().eval)
    remote = FeatureExtractor(f"file://{path}", Config().model, Config().eval)
    assert local.cache_key == remote.cache_key and remote.input_space == "lab"


@pytest.mark.parametrize(
    "option, expected",
    [
        ("data.root=/nowhere/videos", "/nowhere/videos: not a shard folder"),
        ("--init=/nowhere/spatial-final.pt", "--init /nowhere/spatial-final.pt: no such checkpoint file"),
    ],
)
def test_train_checks_data_and_init_before_ray_starts(tmp_path, stderr, monkeypatch, option, expected):
    import stt.train

    def too_late(*args, **kwargs):  # Ray may already run in this test session: the check must come first
        raise AssertionError("the input was checked after Ray or a stage started")

    monkeypatch.setattr(stt.train, "start_ray", too_late)
    monkeypatch.setattr(stt.train, "run_stage", too_late)
    code, line = one_line_error(stderr, train_main, "stt.train", ["--storage", str(tmp_path), option])
    assert code == 1 and expected in line


def test_train_refuses_global_distillation_without_a_teacher_before_ray_starts(tiny, tmp_path, stderr, monkeypatch):
    """The temporal stage of a distilling recipe with no --init failed inside every Ray worker, four times."""
    import stt.train

    def too_late(*args, **kwargs):
        raise AssertionError("the teacher was checked after Ray or a stage started")

    monkeypatch.setattr(stt.train, "start_ray", too_late)
    monkeypatch.setattr(stt.train, "run_stage", too_late)
    argv = ["--storage", str(tmp_path), "--stage", "temporal", f"data.root={tiny['ytvos']}", "temporal.beta=10"]
    code, line = one_line_error(stderr, train_main, "stt.train", argv)
    assert code == 2 and "temporal.beta=10.0 (train.recipe=spatial-then-temporal) needs a frozen teacher" in line


def test_train_names_unwritable_storage(tmp_path, stderr, tiny):
    blocked = tmp_path / "a-file"  # a file where the storage folder should be: no run folder can be made
    blocked.write_text("x")
    _, line = one_line_error(stderr, train_main, "stt.train", ["--storage", str(blocked), f"data.root={tiny['ytvos']}"])
    assert f"--storage: cannot write the run folder {blocked}/stt" in line


def test_a_corrupt_feature_cache_entry_is_recomputed_with_a_warning(tiny, tmp_path, capsys):
    """Issue 18: a damaged cache file failed with no path and no hint; it is only a cache."""
    import os
    import stat

    argv = [
        "davis",
        "--davis-root",
        str(tiny["davis"]),
        "--checkpoint",
        "lab:8",
        "--feature-cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    first = evaluate_main(argv)
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert entries and all(stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~current_umask() for p in entries)  # shareable
    entries[0].write_bytes(b"not an array")
    capsys.readouterr()
    again = evaluate_main(argv)
    assert f"feature cache entry {entries[0]} is unreadable" in capsys.readouterr().out
    assert (
        again["summary"] == first["summary"] and again["network_calls"] == 0 == first["network_calls"]
    )  # Lab: no network


def current_umask() -> int:
    from stt.cache import current_umask as umask

    return umask()


# ----------------------------------------------------------------------------------------- issue 28
# Reliability, second pass: nothing overwrites inputs, non-finite values never train, every option checked early.


def files_of(root) -> dict:
    """{path: bytes} of every file under `root`: what a refused command must leave as it was."""
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "out, expected",
    [
        ("Annotations/480p", "lies inside the input --davis-root"),  # the case that overwrote the ground truth
        (".", "is the input --davis-root"),
        ("..", "holds the input --davis-root"),
        ("link-into-annotations", "lies inside the input --davis-root"),  # a symbolic link is followed
    ],
)
def test_evaluate_refuses_an_out_folder_in_the_dataset(tiny, tmp_path, stderr, out, expected):
    """Issue 28: `--out D/Annotations/480p` overwrote DAVIS's ground-truth PNGs, exit 0; the next evaluation of D
    scored J&F 1.000."""
    import shutil

    root = tmp_path / "davis"
    shutil.copytree(tiny["davis"], root)
    (root / "link-into-annotations").symlink_to(root / "Annotations" / "480p" / DAVIS(root).sequences[0])
    before = files_of(root)
    argv = ["davis", "--davis-root", str(root), "--checkpoint", "lab:8", "--out", str(root / out), "--device", "cpu"]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert code == 2 and f"--out {root / out}: {expected} {root}" in line
    assert files_of(root) == before


def test_evaluate_refuses_a_feature_cache_in_the_dataset(tiny, tmp_path, stderr):
    cache = tiny["davis"] / "features"
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--checkpoint", "lab:8", "--feature-cache", str(cache)]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", [*argv, "--out", str(tmp_path / "out")])
    assert code == 2 and f"--feature-cache {cache}: lies inside the input --davis-root" in line
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_score_refuses_a_json_file_among_its_inputs(tiny, tmp_path, stderr):
    results = tmp_path / "results"
    results.mkdir()
    for json_path, option in ((results / "scores.json", "--results"), (tiny["davis"] / "scores.json", "--davis-root")):
        argv = ["score", "--davis-root", str(tiny["davis"]), "--results", str(results), "--json", str(json_path)]
        code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
        assert code == 2 and f"--json {json_path}: lies inside the input {option}" in line
        assert not json_path.exists()


def test_prepare_refuses_shards_inside_the_source(tiny, stderr):
    before = files_of(tiny["ytvos"])
    out = tiny["ytvos"] / "shards"
    code, line = one_line_error(stderr, prepare.main, "stt.prepare", ["ytvos", str(tiny["ytvos"]), str(out)])
    assert code == 2 and f"OUT {out}: lies inside the input SRC {tiny['ytvos']}" in line
    assert files_of(tiny["ytvos"]) == before


@pytest.mark.parametrize("where", ["storage", "tensorboard"])
def test_train_refuses_a_run_folder_in_its_data(tiny, tmp_path, stderr, monkeypatch, where):
    import stt.train

    def too_late(*args, **kwargs):
        raise AssertionError("the run folder was checked after Ray or a stage started")

    monkeypatch.setattr(stt.train, "start_ray", too_late)
    monkeypatch.setattr(stt.train, "run_stage", too_late)
    inside = tiny["ytvos"] / "runs"
    option = (
        ["--storage", str(inside)] if where == "storage" else ["--storage", str(tmp_path), "--tensorboard", str(inside)]
    )
    code, line = one_line_error(stderr, train_main, "stt.train", [*option, f"data.root={tiny['ytvos']}"])
    assert code == 2 and "lies inside the input data.root" in line and not inside.exists()


def test_train_checks_the_evaluation_set_before_ray_starts(tiny, tmp_path, stderr, monkeypatch):
    """Issue 28: a missing train.eval_davis_root was found by the first evaluation, after Ray started and steps ran."""
    import stt.train

    def too_late(*args, **kwargs):
        raise AssertionError("the evaluation set was checked after Ray or a stage started")

    monkeypatch.setattr(stt.train, "start_ray", too_late)
    monkeypatch.setattr(stt.train, "run_stage", too_late)
    argv = ["--storage", str(tmp_path), f"data.root={tiny['ytvos']}", f"train.eval_davis_root={tmp_path / 'nowhere'}"]
    code, line = one_line_error(stderr, train_main, "stt.train", argv)
    assert code == 1 and f"train.eval_davis_root: {tmp_path / 'nowhere'}" in line
    with pytest.raises(AssertionError, match="after Ray"):  # never evaluated: not checked, the run goes on to Ray
        command.run(train_main, "stt.train", [*argv, "train.eval_every=0"])


def test_prepare_names_the_unreadable_frames(tiny, tmp_path, capsys):
    """Issue 28: `prepare` counted unreadable JPEGs without naming them."""
    import shutil

    src = tmp_path / "ytvos"
    shutil.copytree(tiny["ytvos"], src)
    frames = sorted(src.rglob("*.jpg"))
    broken = frames[:7]
    for frame in broken:
        frame.write_bytes(b"not a jpeg")
    prepare.main(["ytvos", str(src), str(tmp_path / "shards"), "--workers", "1"])
    out = capsys.readouterr().out
    assert "7 unreadable" in out
    named = [line for line in out.splitlines() if "unreadable frames" in line]
    assert len(named) == 1 and all(str(frame) in named[0] for frame in broken[:5])
    assert str(broken[5]) not in named[0] and "and 2 more" in named[0]


def stt_checkpoint(path, change=None):
    """A temporal-stage checkpoint of a random encoder, its weights first passed to `change`."""
    from stt.models import build_encoder, encoder_state_dict
    from stt.recipes import stage_spec

    spec = stage_spec(Config(), "temporal")
    encoder = build_encoder(spec.config.model)
    weights = encoder_state_dict(encoder)
    if change is not None:
        change(weights)
    optimizer = torch.optim.Adam(encoder.parameters())
    torch.save(checkpoint.payload(weights, spec.config, "temporal", 1, optimizer), path)
    return path


def test_evaluate_refuses_a_checkpoint_with_non_finite_weights(tiny, tmp_path, stderr):
    """Issue 28: a diverged run's checkpoint evaluated to J&F 0.000, exit 0."""

    def diverge(weights):
        weights["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
        weights["layer4.1.bn2.running_var"][3] = float("inf")

    path = stt_checkpoint(tmp_path / "diverged.pt", diverge)
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--checkpoint", str(path), "--out", str(tmp_path / "out")]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert code == 1 and f"{path}: 2 of " in line
    assert "hold NaN or infinite values (the first: layer2.0.conv1.weight)" in line
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_half_its_weights_is_one_short_line_naming_it(tiny, tmp_path, stderr):
    """Issue 28: one 1,859-character line listing every key, without the file's name."""

    def drop_half(weights):
        for key in sorted(weights)[::2]:
            del weights[key]

    path = stt_checkpoint(tmp_path / "half.pt", drop_half)
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--checkpoint", str(path), "--out", str(tmp_path / "out")]
    _, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    missing = re.search(r"weights do not fit a resnet18 encoder \(120 tensors\): 60 missing keys \[(.*?)\]", line)
    assert line.startswith(f"stt.evaluate: error: {path}: ") and missing, line
    assert missing.group(1).count(",") == 5 and missing.group(1).endswith("... 55 more") and len(line) < 400


def test_evaluate_reads_a_ray_checkpoint_folder_and_names_any_other_folder(tiny, tmp_path, stderr):
    """Issue 28: a Ray Train checkpoint folder was called "does not exist"; it holds checkpoint.pt, which is read."""
    from stt.features import FeatureExtractor

    folder = tmp_path / "temporal" / "temporal-step0000002"
    folder.mkdir(parents=True)
    stt_checkpoint(folder / checkpoint.CHECKPOINT_FILE)
    from_folder = FeatureExtractor(str(folder), Config().model, Config().eval)
    from_file = FeatureExtractor(str(folder / checkpoint.CHECKPOINT_FILE), Config().model, Config().eval)
    assert from_folder.cache_key == from_file.cache_key
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--checkpoint", str(tmp_path / "temporal")]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", [*argv, "--out", str(tmp_path / "out")])
    assert code == 1 and f"--checkpoint {tmp_path / 'temporal'}: a folder without checkpoint.pt" in line


@pytest.mark.parametrize("uri", ["hdfs://namenode/runs/final.pt", "http://example.invalid/final.pt"])
def test_an_unsupported_uri_scheme_is_refused_at_once(tiny, tmp_path, stderr, uri):
    argv = ["davis", "--davis-root", str(tiny["davis"]), "--checkpoint", uri, "--out", str(tmp_path / "out")]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)
    assert code == 2 and f"{uri}: unsupported URI scheme" in line and "file://, s3://, gs://" in line


def silent_server():
    """A local endpoint that accepts connections and never answers (a proxy or store gone quiet)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


# The command line in a process of its own, with the contact timeout shortened: a request left waiting must not
# hold the process at exit (pyarrow's S3 support waits for requests in flight).
SHORT_TIMEOUT = """
import sys
from stt import command, storage
from stt.evaluate import main
storage.CONTACT_TIMEOUT_S = float(sys.argv.pop(1))
sys.exit(command.run(main, "stt.evaluate", sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "uri, timeout, reason",
    [
        # nothing listens there: refused after pyarrow's own retries (a 34-line traceback before issue 28)
        ("s3://bucket/final.pt?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1", 25, "could not be reached"),
        # accepts and never answers: only the timeout ends it
        (
            "s3://bucket/final.pt?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1",
            3,
            "no answer within 3 s",
        ),
        # gs:// retried in silence for minutes (120 s and on, before issue 28)
        ("gs://bucket/final.pt?endpoint_override=127.0.0.1:{port}&scheme=http", 3, "(no answer within|could not be)"),
    ],
)
def test_an_unreachable_object_store_is_one_line_within_the_timeout(tiny, tmp_path, uri, timeout, reason):
    import subprocess
    import sys
    import time

    server = silent_server()
    uri = uri.format(port=server.getsockname()[1])
    started = time.monotonic()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                SHORT_TIMEOUT,
                str(timeout),
                "davis",
                "--davis-root",
                str(tiny["davis"]),
                "--checkpoint",
                uri,
                "--out",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        server.close()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert re.match(rf"stt.evaluate: error: {re.escape(uri)}: .*{reason}", lines[0]), lines[0]
    assert time.monotonic() - started < timeout + 40  # imports included; the store gets `timeout` s, 30 s in real use


@pytest.mark.parametrize(
    "option, expected",
    [
        ("--workers=999", "--workers 999: this machine has"),
        ("--workers=0", "--workers: expected at least 1, got 0"),
        ("--cpus-per-worker=nan", "--cpus-per-worker: expected a positive number, got nan"),
    ],
)
def test_train_refuses_more_workers_than_cpus_without_a_cluster(tiny, tmp_path, stderr, monkeypatch, option, expected):
    """Issue 28: `--workers 999` on 2 cores asked Ray for 999 workers at 0.001 CPU each, with no message."""
    import stt.train

    def too_late(*args, **kwargs):
        raise AssertionError("the worker count was checked after Ray or a stage started")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(stt.train, "start_ray", too_late)
    monkeypatch.setattr(stt.train, "run_stage", too_late)
    argv = ["--storage", str(tmp_path), f"data.root={tiny['ytvos']}", option]
    code, line = one_line_error(stderr, train_main, "stt.train", argv)
    assert code == 2 and expected in line


def test_overrides_are_taken_anywhere_on_the_command_line(tiny, tmp_path, stderr):
    """Issue 28: an override after an option (a second run of them) was "unrecognized arguments"."""
    from stt.evaluate import get_args_parser

    argv = ["davis", "propagation.topk=5", "--davis-root", str(tiny["davis"]), "eval.layer=res9", "--out", "o"]
    assert command.parse_args(get_args_parser(), argv).overrides == ["propagation.topk=5", "eval.layer=res9"]
    code, line = one_line_error(stderr, evaluate_main, "stt.evaluate", argv)  # applied: its value is checked
    assert code == 2 and "eval.layer: expected one of" in line
    code, line = one_line_error(
        stderr, train_main, "stt.train", ["train.seed=1", "--storage", str(tmp_path), "temporal.lr=inf"]
    )
    assert code == 2 and "temporal.lr: expected a finite number" in line
    with pytest.raises(SystemExit) as refused:  # anything else left over is still argparse's usage error
        command.parse_args(get_args_parser(), [*argv, "--bogus"])
    assert refused.value.code == 2 and "unrecognized arguments: --bogus" in stderr()


@pytest.mark.parametrize(
    "root, code, expected",
    [
        ("hdfs://namenode/shards", 2, "hdfs://namenode/shards: unsupported URI scheme 'hdfs://'"),
        (
            "s3://bucket/shards?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1",
            1,
            "s3://bucket/shards?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1: the object store refused",
        ),
    ],
)
def test_a_data_root_uri_is_checked_the_same_way(tmp_path, stderr, monkeypatch, root, code, expected):
    """The training data's shards (data.root) and prepare's OUT go through the same storage module as checkpoints."""
    import stt.train

    def too_late(*args, **kwargs):
        raise AssertionError("the data root was checked after Ray or a stage started")

    monkeypatch.setattr(stt.train, "start_ray", too_late)
    got, line = one_line_error(stderr, train_main, "stt.train", ["--storage", str(tmp_path), f"data.root={root}"])
    assert got == code and expected in line
