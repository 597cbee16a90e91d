"""How a sweep's phase knows it finished: `check_finished` for Tune's trials, `fit_in_driver` for a stage the
driver trains itself. Ctrl-C in either is an InterruptedRun naming the phase, which `--resume` continues."""

from __future__ import annotations

import signal
import threading

import ray
from ray import tune

from stt.errors import InterruptedRun
from stt.train import check_stopped

RESUME = "run the same command with --resume to continue"


def check_finished(results, phase: str, kind: str, planned: int) -> None:
    """InterruptedRun unless every planned trial of the phase finished (TERMINATED, or ERROR: recorded as failed).

    On Ctrl-C, Tune saves the experiment and `Tuner.fit()` returns the trials so far as if done; going
    on would choose among them and report a sweep that never ran. The trials not finished are resumed
    by `--resume` (Tuner.restore, resume_unfinished), the finished ones kept.
    The statuses are read from the experiment state Tune saved as the run ended: the ResultGrid's are
    taken after Tune's cleanup, which marks every trial it stopped TERMINATED, the interrupted ones too
    (Ray 2.60; results.num_terminated counted 2 of 2 after Ctrl-C with one trial running).
    """
    default_sigint()
    saved = tune.ExperimentAnalysis(results.experiment_path).trials  # Ray: the trials as saved, with their statuses
    finished = sum(trial.status in ("TERMINATED", "ERROR") for trial in saved)
    if finished < planned:
        raise InterruptedRun(f"{phase} interrupted after {finished} of {planned} {kind} trials; {RESUME}")


def default_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt again. Tune's handler (after a fit, it stays installed and would
    swallow the next Ctrl-C) and Ray Train's (bound to a controller that is gone) are removed."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fit_in_driver(trainer, phase: str, steps: int) -> ray.train.Result:
    """`trainer.fit()` of a stage the driver trains itself, or InterruptedRun if Ctrl-C stopped it or it ended
    before `steps`.

    Run in a thread: there Ray Train installs no SIGINT handler of its own (in the main thread its handler
    aborts the run and ends the process with status 1 and no word, or 0), so Ctrl-C reaches this thread as
    KeyboardInterrupt. The run's checkpoints stay where `--resume` picks them up; its controller and
    workers end with the driver's Ray.
    """
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - raised again in the main thread just below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name=f"sweep: {phase}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
    except KeyboardInterrupt:
        raise InterruptedRun(f"{phase} interrupted; {RESUME}") from None
    if "error" in outcome:
        raise outcome["error"]
    result = check_stopped(outcome["result"])  # a non-finite loss: its line, not "stopped at step N; --resume"
    step = (result.metrics or {}).get("step", 0)
    if result.checkpoint is None or step < steps:
        raise InterruptedRun(f"{phase} stopped at step {step} of {steps}; {RESUME}")
    return result
