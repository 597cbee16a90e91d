"""bench/gpu_suite.py: its helpers against hand-computed values, and `--smoke` end to end on the CPU,
so the suite is known to run before a GPU is lent."""

import json
import time

import pytest

from bench import gpu_suite


def test_compare_reference_averages_objects_and_applies_the_tolerance():
    rows = [
        {"sequence": "a", "object": 1, "J-Mean": 0.5, "F-Mean": 0.7},
        {"sequence": "a", "object": 2, "J-Mean": 0.3, "F-Mean": 0.1},  # a: (0.8 + 0.8) / 4 = 0.4
        {"sequence": "b", "object": 1, "J-Mean": 0.9, "F-Mean": 0.8},  # b: 0.85
    ]
    check = gpu_suite.compare_reference(rows, {"sequences": {"a": {"J&F": 0.4009}, "b": {"J&F": 0.85}}})
    assert check["ok"] and check["missing"] == []
    assert check["compared"]["a"]["J&F"] == pytest.approx(0.4)
    assert check["compared"]["a"]["abs_diff"] == pytest.approx(0.0009)
    assert not gpu_suite.compare_reference(rows, {"sequences": {"a": {"J&F": 0.4011}}})["ok"]
    # Nothing compared is not a pass.
    nothing = gpu_suite.compare_reference(rows, {"sequences": {"c": {"J&F": 0.1}}})
    assert not nothing["ok"] and nothing["missing"] == ["c"]


def test_stopwatch_times_nested_calls_exclusively():
    import torch

    watch = gpu_suite.Stopwatch(torch.device("cpu"))
    inner = watch.wrap("inner", lambda: time.sleep(0.05))

    def outer_body():
        time.sleep(0.02)
        inner()

    watch.wrap("outer", outer_body)()
    assert watch.seconds["inner"] == pytest.approx(0.05, abs=0.03)
    assert watch.seconds["outer"] == pytest.approx(0.02, abs=0.015)  # the inner 0.05 s is not counted twice


def test_patched_restores_attributes_even_on_error():
    class Owner:
        value = 1

    with pytest.raises(RuntimeError), gpu_suite.patched([(Owner, "value", 2)]):
        assert Owner.value == 2
        raise RuntimeError
    assert Owner.value == 1


def test_smoke_runs_every_cpu_part_and_writes_the_json(tmp_path, one_thread):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"sequences": {"no-such-sequence": {"J&F": 0.5}}}))
    out = tmp_path / "suite.json"
    gpu_suite.main(
        ["--smoke", "--parts", "propagation", "step", "evaluate", "--out", str(out), "--reference", str(reference)]
    )
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["smoke"] and set(parts) == {"propagation", "step", "evaluate"}
    assert all(part["ok"] for part in parts.values()), {k: v.get("error") for k, v in parts.items()}

    rows = {(r["implementation"], r["dtype"]): r for r in parts["propagation"]["rows"]}
    assert set(rows) >= {("dense", "float32"), ("windowed", "float32"), ("dense", "float16"), ("windowed", "float16")}
    assert rows[("dense", "float32")]["argmax_agreement"] == 1.0  # the reference itself
    assert rows[("windowed", "float32")]["argmax_agreement"] > 0.99  # the same predictor, computed differently

    step = parts["step"]["rows"]
    assert {(r["what"], r["compile"]) for r in step} == {("backbone", False), ("temporal", False)}
    bare = next(r for r in step if r["what"] == "backbone")
    temporal = next(r for r in step if r["what"] == "temporal")
    assert bare["fraction_of_bare"] == 1.0
    assert temporal["fraction_of_bare"] == pytest.approx(bare["step_s"] / temporal["step_s"])

    evaluate = parts["evaluate"]
    assert evaluate["network_calls"] > 0 and evaluate["frames"] > 0  # a fresh cache: the network ran
    assert all(evaluate["split_s"][k] > 0 for k in ("decode", "features", "propagation", "scoring"))
    assert sum(evaluate["split_s"].values()) == pytest.approx(evaluate["wall_s"])
    assert 0.0 <= evaluate["summary"]["J&F-Mean"] <= 1.0
    assert evaluate["reference_check"]["missing"] == ["no-such-sequence"] and not evaluate["reference_check"]["ok"]


def test_a_failing_part_is_recorded_and_the_others_run(tmp_path, one_thread):
    out = tmp_path / "suite.json"
    gpu_suite.main(
        [
            "--smoke",
            "--parts",
            "propagation",
            "evaluate",
            "--out",
            str(out),
            "--reference",
            str(tmp_path / "missing.json"),
        ]
    )
    parts = json.loads(out.read_text())["parts"]
    assert parts["propagation"]["ok"]
    assert not parts["evaluate"]["ok"] and "missing.json" in parts["evaluate"]["error"]


@pytest.mark.slow
def test_smoke_train_part_reports_throughput(tmp_path, ray_local):
    out = tmp_path / "suite.json"
    gpu_suite.main(["--smoke", "--parts", "train", "--out", str(out)])
    train = json.loads(out.read_text())["parts"]["train"]
    assert train["ok"], train.get("traceback")
    assert train["pairs_per_s"] > 0 and 0.0 <= train["data_wait_fraction"] <= 1.0
    assert train["batch"] == 4 and train["steps"] == 4
