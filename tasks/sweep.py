"""Steps of the sweep flow (flows/sweep.py) over qlora/sweep.py and qlora/sweep_report.py, and `run_trials`, which
fans the trials out as `run-trial` task runs, each a flow run of `qlora-finetune`: a subflow in this process, or a
run of a finetune deployment that a worker picks up (`trial_deployment`). At most as many trials are in flight as
the GPU slots allow; each trial's flow run also holds its slots itself (tasks/gpu_slots.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import optuna
from prefect import get_run_logger, tags, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.utilities.annotations import opaque, quote

from pipeline_config.schema import PipelineConfig
from pipeline_config.sweep import SweepSpace, load_sweep_space
from qlora.errors import PipelineInputError, Refused
from qlora.report import mlflow_run_url
from qlora.run_folder import RunFolder, mark_finished
from qlora.services import resolve_tracking_uri
from qlora.sweep import (
    TrialFailed,
    TrialOutcome,
    TrialSpec,
    best_trial,
    claim_sweep_folder,
    open_study,
    parent_params,
    register_best_trial,
    sweep_fingerprint,
    trial_outcome,
)
from qlora.sweep_report import SPACE_ARTIFACT, log_sweep_results, registered_line, summary_markdown
from qlora.sweep_schedule import run_trials as schedule_trials
from qlora.sweep_schedule import trial_parallelism
from qlora.tracking import tracking_run
from qlora.trial import SweepTrial

SWEEP_SUMMARY_ARTIFACT_KEY = "qlora-sweep-summary"
SWEEP_MLFLOW_LINK_KEY = "qlora-sweep-mlflow-run"


@task(name="validate-sweep-space", cache_policy=NO_CACHE, persist_result=False)
def validate_sweep_space_task(space_path: str, cfg: PipelineConfig) -> SweepSpace:
    """The space file checked against the run config. Raises SweepSpaceError listing every problem with its line."""
    return load_sweep_space(space_path, cfg)


@task(name="plan-trial-slots", cache_policy=NO_CACHE, persist_result=False)
def plan_trial_slots_task(space: SweepSpace, trial_deployment: str | None) -> int:
    """How many trials may be in flight. In this process: one (they would share its CPUs / GPU). Through a
    deployment: `max_parallel_trials`, at most as many as the GPU concurrency limit has slots for (each trial holds
    `training.gpu_slots`). Raises PipelineInputError if the deployment does not exist."""
    log = get_run_logger()
    if not trial_deployment:
        log.info("trials run one after another as subflows of this flow run")
        return 1
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    t = space.base.training
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(trial_deployment)
        except ObjectNotFound:
            raise PipelineInputError(
                f"trial deployment {trial_deployment!r} not found on the Prefect server: deploy it (make deploy, or "
                "qlora-flow serve) or run the trials in this process (no --trial-deployment)"
            ) from None
        try:
            limit = client.read_global_concurrency_limit_by_name(t.gpu_concurrency_limit).limit if t.gpu_slots else None
        except ObjectNotFound:
            limit = None
    parallel, why = trial_parallelism(space.config.max_parallel_trials, limit, t.gpu_slots, t.gpu_concurrency_limit)
    log.info("up to %d trial(s) at once through deployment %r (%s)", parallel, trial_deployment, why)
    return parallel


@task(name="claim-sweep-folder", cache_policy=NO_CACHE, persist_result=False)
def claim_sweep_folder_task(
    space: SweepSpace, data_digest: str, model_digest: str, resume: str | None, resume_dir: str | None
) -> RunFolder:
    from qlora.sweep import sweeps_root
    from tasks.run_folder import report_lost_flow_runs

    log = get_run_logger()
    report_lost_flow_runs(str(sweeps_root(space.base)), log)  # a sweep killed before this one never ended
    name = flow_run.name or f"local-{os.getpid()}"
    fingerprint = sweep_fingerprint(space, data_digest, model_digest)
    identity = {"flow_run_id": str(flow_run.id or ""), "flow_run_name": name}
    folder = claim_sweep_folder(space, fingerprint, name, identity, resume, resume_dir)
    folder.begin_attempt(identity)
    log.info("sweep folder %s (%s)", folder.path, folder.reason)
    return folder


@contextlib.contextmanager
def claimed_sweep_folder(space, data_digest: str, model_digest: str, resume, resume_dir) -> Iterator[RunFolder]:
    """The sweep's folder, held until the flow ends (or by the kernel, if the process dies)."""
    folder = claim_sweep_folder_task(quote(space), opaque(data_digest), opaque(model_digest), resume, resume_dir)
    try:
        yield folder
    finally:
        folder.release()


@contextlib.contextmanager
def sweep_parent_run(space: SweepSpace, folder: RunFolder) -> Iterator:
    """The sweep's MLflow parent run (the space and shared config as params; no system metrics, the trials have
    theirs): the run an interrupted attempt of this sweep opened, continued, else a new one. FAILED / KILLED if the
    flow fails."""
    name = f"sweep-{folder.path.name}"
    tracking = space.base.tracking.model_copy(update={"run_name": name})
    cfg = space.base.model_copy(update={"tracking": tracking})
    run_tags = {
        "prefect.flow_run_id": str(flow_run.id or "none"),
        "sweep.name": folder.path.name,
        "sweep.dir": str(folder.path.resolve()),
        "sweep.space_file": space.source,
    }
    previous = folder.continues_mlflow_run_id
    with tracking_run(cfg, run_tags, run_id=previous, params=parent_params(space), system_metrics=False) as run:
        if run.info.run_id != previous:
            folder.record_mlflow_run(run.info.run_id)
        import mlflow

        mlflow.log_text(space.text, SPACE_ARTIFACT)
        yield run


@task(name="open-study", cache_policy=NO_CACHE, persist_result=False)
def open_study_task(space: SweepSpace, folder: RunFolder) -> optuna.Study:
    study = open_study(space, folder.path)
    done = len(study.get_trials(deepcopy=False))
    get_run_logger().info("Optuna study %s: %d of %d trial(s) started before", study.study_name, done, space.n_trials)
    return study


@task(name="run-trial", cache_policy=NO_CACHE, persist_result=False)
def run_trial_task(
    number: int, cfg: PipelineConfig, trial: SweepTrial, metric: str, trial_flow, trial_deployment: str | None
) -> TrialOutcome:
    """Trial `number` as a flow run of `qlora-finetune` named `<sweep flow run>-trial-<number>`: a subflow here, or
    a run of `trial_deployment` on a worker (a subflow of this flow run too); waits for it. Raises TrialFailed when
    it fails (this task run then shows Failed; the sweep records the trial and goes on)."""
    log = get_run_logger()
    name = f"{flow_run.name or 'sweep'}-trial-{number}"
    if trial_deployment:
        from prefect.deployments import run_deployment

        parameters = {"config": cfg.model_dump(mode="json"), "trial": trial.model_dump(mode="json")}
        run = run_deployment(
            trial_deployment, parameters=parameters, flow_run_name=name, tags=["sweep", trial.study_name], timeout=0
        )
        state, flow_run_id = _wait_cancelling_on_stop(run.id, name), str(run.id)
    else:
        with tags("sweep", trial.study_name):
            state = trial_flow.with_options(flow_run_name=name)(config=cfg, trial=trial, return_state=True)
        flow_run_id = str(state.state_details.flow_run_id)
    failure = None if state is not None and state.is_completed() else f"flow run {state.name}: {state.message}"
    outcome = trial_outcome(number, trial.mlflow_run_id, metric, flow_run_id, failure)
    if outcome.state == "FAIL":
        raise TrialFailed(outcome)
    log.info("trial %d %s: %s %.4f", number, outcome.state, metric, outcome.value)
    return outcome


def _wait_cancelling_on_stop(flow_run_id, name: str, poll_s: float = 2.0):
    """Wait for a trial's deployment run to end; when the sweep is stopped (qlora/stop.py), ask Prefect to cancel
    it (its worker then sends the trial's process SIGTERM: it stops at its next step, with a checkpoint)."""
    import time

    from prefect import get_client
    from prefect.states import Cancelling

    from qlora.stop import current as current_stop

    stop, cancelling = current_stop(), False
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
            if stop is not None and stop.requested and not cancelling:
                message = f"the sweep was stopped by {stop.signal_name}"
                client.set_flow_run_state(flow_run_id, Cancelling(message=message), force=True)
                get_run_logger().info("trial %s: cancelling its flow run (%s)", name, message)
                cancelling = True
            time.sleep(poll_s)


def _outcome(future, spec: TrialSpec, run_id: str, metric: str) -> TrialOutcome:
    result = future.result(raise_on_failure=False)
    if isinstance(result, TrialOutcome):
        return result
    if isinstance(result, TrialFailed):
        return result.outcome
    # The task itself broke (e.g. the tracking store was unreachable): the trial failed all the same.
    return trial_outcome(spec.number, run_id, metric, None, f"{type(result).__name__}: {result}")


def run_trials(study, space: SweepSpace, folder: RunFolder, parent_run, trial_flow, trial_deployment, parallel: int):
    """The sweep's trials (qlora/sweep_schedule.py), each a `run-trial` task run, at most `parallel` at once. A stop
    (SIGTERM / SIGINT) reaches every trial in flight: one in this process stops at its next optimizer step; a
    deployment run is cancelled through Prefect."""
    from qlora.stop import current as current_stop

    def launch(spec: TrialSpec, cfg: PipelineConfig, trial: SweepTrial):
        run = run_trial_task.with_options(task_run_name=f"run-trial-{spec.number}")
        return run.submit(spec.number, quote(cfg), opaque(trial), space.metric, opaque(trial_flow), trial_deployment)

    schedule_trials(
        study,
        space,
        folder.path,
        parent_run,
        parallel,
        launch=launch,
        first_ended=lambda futures: next(as_completed(futures)),
        outcome=lambda future, spec, run_id: _outcome(future, spec, run_id, space.metric),
        stop=current_stop(),
        log=get_run_logger(),
    )


@task(name="register-best-trial", cache_policy=NO_CACHE, persist_result=False)
def register_best_trial_task(study: optuna.Study, space: SweepSpace, folder: RunFolder, source):
    """The best trial's adapter as a model version, champion by the usual rule; None when no trial completed or
    the config turns the registry off."""
    best = best_trial(study)
    log = get_run_logger()
    if best is None or not space.base.registry.enabled:
        log.info("nothing registered: %s", "no trial completed" if best is None else "registry.enabled is false")
        return None
    decision = register_best_trial(space, folder.path, best, source)
    role = "champion" if decision.became_champion else "challenger"
    log.info("best trial %d registered as version %s: %s (%s)", best.number, decision.version, role, decision.reason)
    return decision


@task(name="log-sweep-results", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=[5, 30])
def log_sweep_results_task(study: optuna.Study, space: SweepSpace, decision) -> list[dict]:
    """The final results table, plot and counts on the parent run. Retried: the store can fail transiently."""
    return log_sweep_results(study, space, registered_line(space, study, decision))


@task(name="publish-sweep-summary", cache_policy=NO_CACHE, persist_result=False)
def publish_sweep_summary_task(
    space: SweepSpace, study: optuna.Study, rows: list[dict], folder: RunFolder, parent_run, decision
) -> str:
    """Prefect artifacts of the sweep: the trials as a markdown table with the best one marked, and a link to the
    MLflow parent run."""
    uri = resolve_tracking_uri(space.base.tracking)
    registered = registered_line(space, study, decision)
    markdown = summary_markdown(space, rows, str(folder.path), parent_run.info.run_id, registered)
    create_markdown_artifact(markdown=markdown, key=SWEEP_SUMMARY_ARTIFACT_KEY, description="trials, best marked")
    url = mlflow_run_url(uri, parent_run.info.experiment_id, parent_run.info.run_id)
    create_link_artifact(link=url, link_text=f"MLflow sweep run {parent_run.info.run_id}", key=SWEEP_MLFLOW_LINK_KEY)
    return markdown


class SweepFailed(Refused):
    """No trial of the sweep completed."""


@task(name="finish-sweep", cache_policy=NO_CACHE, persist_result=False)
def finish_sweep_task(study: optuna.Study, folder: RunFolder) -> None:
    """Mark the sweep folder finished (never continued: its trials are all told). Raises SweepFailed when no trial
    completed, so the sweep's flow run ends Failed."""
    mark_finished(folder.path)
    if best_trial(study) is None:
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        raise SweepFailed(
            f"no trial of sweep {Path(folder.path).name} completed ({', '.join(states)}): see its summary; nothing "
            "was registered"
        )
