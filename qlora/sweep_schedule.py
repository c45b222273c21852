"""The sweep's trial schedule: how many trials may be in flight, and the loop that keeps that many running until the
space's `n_trials` have finished.

Plain code: how a trial is launched and how the sweep waits for one to end are given to it (tasks/sweep.py passes
Prefect's: a `run-trial` task run each, `as_completed`), so that the scheduling itself is tested without a server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import optuna

from pipeline_config.sweep import SweepSpace
from qlora.sweep import (
    TrialOutcome,
    TrialSpec,
    ask_trial,
    close_interrupted_trial_run,
    interrupted_trials,
    record_trial,
    start_trial_run,
    trial_config,
    trials_to_ask,
)
from qlora.sweep_report import log_sweep_results
from qlora.trial import SweepTrial

# launch(spec, trial config, trial) -> a handle; first_ended(handles) -> the first handle to end;
# outcome(handle, spec, mlflow run id) -> how that trial ended (a failed launch is a FAIL outcome, never an exception).
Launch = Callable[[TrialSpec, Any, SweepTrial], Hashable]
FirstEnded = Callable[[list[Hashable]], Hashable]
Outcome = Callable[[Hashable, TrialSpec, str], TrialOutcome]


def trial_parallelism(
    wanted: int | None, gpu_limit: int | None, gpu_slots_per_trial: int, limit_name: str
) -> tuple[int, str]:
    """How many trials run at once through a deployment, and why: `max_parallel_trials` (`wanted`), at most as many
    as the GPU concurrency limit has slots for (each trial holds `gpu_slots_per_trial`)."""
    if gpu_limit is None:
        why = "no GPU concurrency limit to bound it" if gpu_slots_per_trial else "trials take no GPU slots"
        return wanted or 1, why
    slots = max(1, gpu_limit // gpu_slots_per_trial)
    return min(wanted or slots, slots), f"{gpu_limit} slot(s) of {limit_name!r}, {gpu_slots_per_trial} per trial"


def run_trials(
    study: optuna.Study,
    space: SweepSpace,
    sweep_dir: Path,
    parent_run,
    parallel: int,
    launch: Launch,
    first_ended: FirstEnded,
    outcome: Outcome,
    stop=None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> None:
    """Run the sweep's trials until `n_trials` have finished: first those an interrupted attempt left RUNNING, then
    new ones from the sampler; at most `parallel` at once, each told to the study as it ends (COMPLETE, PRUNED or
    FAIL: a failed trial never fails the sweep) and the parent run's results refreshed.

    A stop (`stop`, qlora/stop.py) reaches every trial in flight: no new trial starts, and once the trials in flight
    have ended the sweep ends with RunInterrupted, its stopped trials left to a resumed sweep."""
    log = log or logging.getLogger(__name__)
    again = interrupted_trials(study, sweep_dir)
    for spec in again:
        close_interrupted_trial_run(spec.previous_run_id)
        log.info("trial %d was interrupted by a crash: running it again with %s", spec.number, spec.params)
    # While trials run, a stop is theirs to act on (each stops at its next step); the sweep then ends here.
    with contextlib.nullcontext() if stop is None else stop.deferred():
        in_flight: dict[Hashable, tuple[TrialSpec, str]] = {}
        while True:
            while len(in_flight) < parallel and (spec := _next_trial(study, space, again, len(in_flight), stop)):
                cfg = trial_config(space, spec.params, sweep_dir, spec.number)
                run_id = start_trial_run(
                    parent_run.info.experiment_id, parent_run.info.run_id, spec, cfg, sweep_dir.name
                )
                trial = SweepTrial(
                    sweep_dir=str(sweep_dir.resolve()),
                    study_name=study.study_name,
                    number=spec.number,
                    mlflow_run_id=run_id,
                    pruning=space.config.pruning,
                )
                log.info("trial %d: %s (MLflow run %s)", spec.number, spec.params, run_id)
                in_flight[launch(spec, cfg, trial)] = (spec, run_id)
            if not in_flight:
                if stop is not None and stop.requested:
                    raise stop.interrupted()  # the trials it ended stay RUNNING: a resumed sweep runs them again
                return
            handle = first_ended(list(in_flight))
            spec, run_id = in_flight.pop(handle)
            ended = outcome(handle, spec, run_id)
            if stop is not None and stop.requested and ended.state == "FAIL":
                log.info("trial %d stopped by %s: left to a resumed sweep", spec.number, stop.signal_name)
                continue
            record_trial(study, spec, ended)
            if ended.state == "FAIL":
                log.warning("trial %d FAILED (recorded; the sweep goes on): %s", spec.number, ended.error)
            elif ended.state == "PRUNED":
                log.info("trial %d PRUNED at step %d", spec.number, ended.pruned_at_step)
            log_sweep_results(study, space)


def _next_trial(
    study: optuna.Study, space: SweepSpace, again: list[TrialSpec], in_flight: int, stop
) -> TrialSpec | None:
    """The next trial to start: an interrupted one first, then a new one the sampler draws; None when none is left
    to start or the sweep is being stopped."""
    if stop is not None and stop.requested:
        return None
    if again:
        return again.pop(0)
    return ask_trial(study, space) if trials_to_ask(study, space, in_flight) else None
