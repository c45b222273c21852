"""Sweeps: fine-tunes of one config that differ in the settings a space file varies (pipeline_config/sweep.py); the
best trial's adapter is registered. The plain functions the sweep flow's steps call (flows/sweep.py).

A sweep keeps its state in a folder of its own, `<training.output_dir>/sweeps/<UTC time>-<flow run name>/`, claimed
like a training run folder (qlora/run_folder.py: locked by the live sweep, fingerprinted, continued only by a sweep
of the same config, space, data, base model and numerics libraries):

    run.lock, run.json, fingerprint.json   as for a training run; run.json lists the sweep's MLflow parent run
    study.journal                          the Optuna study: each trial's params, state, value and eval losses
    trial-<N>/                             trial N's `training.output_dir`: its run folder(s), checkpoints, adapter
    RUN_FINISHED                           the sweep ended; never continued

Optuna holds the trials: a grid's combinations queued in the order listed, or draws of RandomSampler /
TPESampler (seeded per trial, so that a continued sweep draws what the interrupted one would have). It judges them
(MedianPruner / PercentilePruner) on the eval loss a trial reports every few steps while it trains. A trial that
a crashed sweep left RUNNING runs again (its run folder resumes from its newest checkpoint); finished trials
(COMPLETE, PRUNED, FAIL) never do.

MLflow: one parent run per sweep (the space as params; a results table and plot); each trial a child run that the
sweep creates with the trial's params and the trial's finetune flow continues (so a trial that fails before its
flow opens MLflow still has its run, marked FAILED).
"""

from __future__ import annotations

import getpass
import itertools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from pipeline_config.loading import load_pipeline_config
from pipeline_config.schema import PipelineConfig
from pipeline_config.sweep import SweepSpace
from qlora.provenance import NUMERICS_LIBRARIES, library_versions, process_identity
from qlora.run_folder import RunFolder, claim_run_folder, write_fingerprint
from qlora.services import resolve_tracking_uri
from qlora.tracking import config_params
from qlora.trial import (
    PRUNED_TAG,
    build_pruner,
    journal_storage,
    trial_handle,
)

SWEEPS_DIRNAME = "sweeps"
TRIAL_DIR_PREFIX = "trial-"
MLFLOW_RUN_ATTR = "mlflow_run_id"  # Optuna user attribute: the trial's MLflow run (the newest attempt's)
FLOW_RUN_ATTR = "prefect_flow_run_id"
ERROR_ATTR = "error"
STATE_TAG = "sweep.trial_state"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class TrialSpec:
    """A trial the sweep is about to run: its number and params, and the Optuna trial to tell."""

    number: int
    params: dict[str, Any]
    trial: optuna.trial.Trial
    previous_run_id: str | None = None  # an interrupted attempt's MLflow run (a crashed sweep's trial, run again)


@dataclass
class TrialOutcome:
    """How a trial ended, as the sweep tells Optuna."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None
    mlflow_run_id: str
    flow_run_id: str | None = None
    pruned_at_step: int | None = None
    error: str | None = None


class TrialFailed(Exception):
    """A trial's flow run failed; the sweep records it and goes on."""

    def __init__(self, outcome: TrialOutcome):
        super().__init__(f"trial {outcome.number} failed: {outcome.error}")
        self.outcome = outcome


# --- the sweep's folder ------------------------------------------------------------------------------------------


def sweeps_root(cfg: PipelineConfig) -> Path:
    return Path(cfg.training.output_dir) / SWEEPS_DIRNAME


def sweep_fingerprint(space: SweepSpace, data_digest: str, base_model_digest: str) -> dict[str, Any]:
    """What a sweep is: its config (all of it: evaluation and registry settings decide which trial wins), its
    space, the data, the base weights and the numerics libraries. A continued sweep must match it."""
    config = {k: v for k, v in space.base.to_flat_dict().items() if k != "training.resume"}
    space_cfg = space.config.model_dump(mode="json", exclude={"max_parallel_trials"})
    flat = {f"space.{k}": v for k, v in space_cfg.items() if not isinstance(v, dict)}
    for section in ("parameters", "overrides", "pruning"):
        flat |= {f"space.{section}.{k}": v for k, v in space_cfg[section].items()}
    return {
        "config": config | flat,
        "data_digest": data_digest,
        "base_model_digest": base_model_digest,
        "library_versions": library_versions(NUMERICS_LIBRARIES),
    }


def claim_sweep_folder(
    space: SweepSpace,
    fingerprint: dict[str, Any],
    run_name: str,
    flow_run: dict[str, Any],
    resume: str,
    resume_dir: str | None,
) -> RunFolder:
    """This sweep's folder under `<training.output_dir>/sweeps/`, locked: the newest unfinished sweep of the same
    fingerprint that no live process holds (`resume` 'auto'), `resume_dir` (refused if it is another sweep's), or a
    new one. Raises PipelineInputError for a `resume_dir` that cannot be continued."""
    folder = claim_run_folder(sweeps_root(space.base), fingerprint, run_name, flow_run, resume, resume_dir)
    if not folder.resumed:
        write_fingerprint(folder.path, fingerprint)  # from now on a later sweep of the same fingerprint continues it
    return folder


# --- the study ---------------------------------------------------------------------------------------------------


def build_sampler(space: SweepSpace, trial_number: int) -> optuna.samplers.BaseSampler:
    """The sampler for trial `trial_number`, seeded by the space's seed and that number, so a sweep continued after
    a crash draws the same trials as an uninterrupted one (a sampler seeded once would start its draws over). A
    grid's trials are queued when the study is created (`open_study`) and need no sampler."""
    seed = space.config.seed * 1_000_003 + trial_number
    if space.config.method == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def grid_points(space: SweepSpace) -> list[dict[str, Any]]:
    """Every combination of a grid's values, in the order listed (the first parameter varies slowest)."""
    keys = list(space.parameters)
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(space.parameters[k].choices for k in keys))
    ]


def distributions(space: SweepSpace) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for key, p in space.parameters.items():
        if p.kind == "choice":
            out[key] = CategoricalDistribution(list(p.choices))
        elif p.kind in ("int", "logint"):
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.kind == "logint")
        else:
            out[key] = FloatDistribution(p.low, p.high, log=p.kind == "loguniform")
    return out


def open_study(space: SweepSpace, sweep_dir: Path) -> optuna.Study:
    """The sweep's Optuna study, created in the sweep folder or loaded from it (a continued sweep). A new grid
    sweep queues its combinations in the order listed (`enqueue_trial`), so trial N is combination N; Optuna's
    GridSampler would shuffle them, and it stops the study from inside `tell` (optuna#5141), which only works
    within `study.optimize`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs each trial itself
    study = optuna.create_study(
        study_name=sweep_dir.name,
        storage=journal_storage(sweep_dir),
        sampler=build_sampler(space, 0),
        pruner=build_pruner(space.config.pruning),
        direction="maximize" if space.greater_is_better else "minimize",
        load_if_exists=True,
    )
    if space.config.method == "grid":
        for point in grid_points(space):  # a study continued after a crash keeps what it has (and its order)
            study.enqueue_trial(point, skip_if_exists=True)
    return study


def interrupted_trials(study: optuna.Study, sweep_dir: Path) -> list[TrialSpec]:
    """Trials an earlier, crashed attempt of this sweep left RUNNING, to be run again (the caller holds the sweep
    folder, so no live sweep runs them)."""
    storage = journal_storage(sweep_dir)
    return [
        TrialSpec(t.number, dict(t.params), trial_handle(study, storage, t.number), t.user_attrs.get(MLFLOW_RUN_ATTR))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    ]


def trials_to_ask(study: optuna.Study, space: SweepSpace, in_flight: int) -> int:
    """New trials still to draw: `n_trials` minus the finished ones and those running now."""
    finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
    return max(0, space.n_trials - finished - in_flight)


def ask_trial(study: optuna.Study, space: SweepSpace) -> TrialSpec:
    study.sampler = build_sampler(space, len(study.get_trials(deepcopy=False)))
    trial = study.ask(distributions(space))
    return TrialSpec(trial.number, dict(trial.params), trial)


# --- a trial: its config, its MLflow run, its outcome ------------------------------------------------------------


def absolute_tracking_uri(cfg: PipelineConfig) -> str:
    """The tracking URI with a local SQLite path made absolute, so that a trial's flow run on a worker started in
    another folder writes to the same store."""
    uri = resolve_tracking_uri(cfg.tracking)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def trial_config(space: SweepSpace, params: dict[str, Any], sweep_dir: Path, number: int, register=False):
    """Trial `number`'s config: the sweep's base with the trial's values, its own output folder in the sweep folder
    (auto-resumed, so a trial run again continues its checkpoints), the sweep's metric, and no registration (the
    sweep registers the best trial once all have run; `register` gives the config it registers with)."""
    values = {
        **params,
        "training.output_dir": str(sweep_dir.resolve() / f"{TRIAL_DIR_PREFIX}{number}"),
        "training.resume": "auto",
        "registry.enabled": register,
        "registry.metric": space.metric,
        "registry.greater_is_better": space.greater_is_better,
        "tracking.tracking_uri": absolute_tracking_uri(space.base),
        "tracking.run_name": f"{sweep_dir.name}-trial-{number}",
    }
    return load_pipeline_config(space.base.model_dump(mode="json"), values)


def parent_params(space: SweepSpace) -> dict[str, Any]:
    """The parent run's params: the space, and the config every trial shares (the swept settings left out)."""
    shared = {
        k: v for k, v in config_params(space.base).items() if k not in space.parameters and k != "training.resume"
    }
    return shared | space.flat()


def start_trial_run(experiment_id: str, parent_run_id: str, spec: TrialSpec, cfg: PipelineConfig, sweep: str) -> str:
    """Create trial `spec`'s MLflow run under the sweep's parent run, with the trial's params, and leave it RUNNING
    for the trial's flow to continue. Tagged with this (the sweep's) process, so that the closer of interrupted runs
    leaves it alone while the sweep lives."""
    me = process_identity()
    tags = {
        MLFLOW_PARENT_RUN_ID: parent_run_id,
        "mlflow.user": getpass.getuser(),
        "sweep.name": sweep,
        "sweep.trial_number": str(spec.number),
        "process.pid": str(me["pid"]),
        "process.host": me["host"],
        "process.start_time": repr(me["start_time"]),
    }
    if spec.previous_run_id:
        tags["continues_run_id"] = spec.previous_run_id
    client = MlflowClient()
    run_id = client.create_run(experiment_id, tags=tags, run_name=cfg.tracking.run_name).info.run_id
    params = [Param(k, str(v)) for k, v in {**config_params(cfg), "sweep.trial_number": spec.number}.items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i : i + 100])
    spec.trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
    return run_id


def close_interrupted_trial_run(run_id: str | None) -> None:
    """The MLflow run of a trial a crashed sweep left behind: KILLED, if nothing closed it yet."""
    if not run_id:
        return
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, "killed_reason", "the sweep running this trial ended without closing it (found later)")


def trial_outcome(number: int, run_id: str, metric: str, flow_run_id: str | None, failure: str | None) -> TrialOutcome:
    """How trial `number` ended, from its flow run's end (`failure`: why it failed, None if it completed) and its
    MLflow run (the metric, the step its pruner stopped it at). A failed trial's MLflow run ends FAILED, also when
    the trial failed before its flow opened it."""
    client = MlflowClient()
    run = client.get_run(run_id)
    value = run.data.metrics.get(metric)
    if failure is None and (value is None or not math.isfinite(value)):
        failure = f"the trial logged no finite {metric}"
    if failure is not None:
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED")
        client.set_tag(run_id, "sweep.error", failure[:500])
        client.set_tag(run_id, STATE_TAG, "FAIL")
        return TrialOutcome(number, "FAIL", None, run_id, flow_run_id, error=failure)
    pruned = run.data.tags.get(PRUNED_TAG)
    state = "PRUNED" if pruned else "COMPLETE"
    client.set_tag(run_id, STATE_TAG, state)
    return TrialOutcome(number, state, value, run_id, flow_run_id, int(pruned) if pruned else None)


def record_trial(study: optuna.Study, spec: TrialSpec, outcome: TrialOutcome) -> None:
    """Tell the study how the trial ended (with its MLflow and Prefect runs as user attributes)."""
    if outcome.flow_run_id:
        spec.trial.set_user_attr(FLOW_RUN_ATTR, outcome.flow_run_id)
    if outcome.error:
        spec.trial.set_user_attr(ERROR_ATTR, outcome.error[:500])
    if outcome.state == "COMPLETE":
        study.tell(spec.trial, outcome.value)
    else:
        study.tell(spec.trial, state=TrialState.PRUNED if outcome.state == "PRUNED" else TrialState.FAIL)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial by the sweep's metric (the first of equals); None if none completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


# --- the best trial's adapter into the registry ------------------------------------------------------------------


def register_best_trial(space: SweepSpace, sweep_dir: Path, best: optuna.trial.FrozenTrial, source):
    """Register the best trial's adapter from its MLflow run (as a version whose run is that trial's run) and apply
    the champion rule (qlora/registry.py) on the sweep's metric. Returns the PromotionDecision. A sweep continued
    after it registered (and crashed before it ended) gets the decision it made then, not a second version."""
    from qlora.registry import PromotionDecision, register_adapter

    cfg = trial_config(space, dict(best.params), sweep_dir, best.number, register=True)
    run_id = best.user_attrs[MLFLOW_RUN_ATTR]
    run = MlflowClient().get_run(run_id)
    tags = run.data.tags
    if "registry.version" in tags:
        metric = run.data.metrics
        return PromotionDecision(
            tags["registry.version"],
            tags["registry.decision"] == "champion",
            tags["registry.reason"],
            metric.get("registry.candidate_metric"),
            metric.get("registry.champion_metric"),
            None,
        )
    # The run's results (as log-results logged them), not the system or per-step training metrics.
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("base_", "finetuned_", "train_"))}
    adapter_dir = Path(tags["adapter_dir"])
    with tempfile.TemporaryDirectory(prefix="sweep-best-") as tmp:
        if not adapter_dir.is_dir():  # trained on a worker whose disk this process does not see
            adapter_dir = Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter", dst_path=tmp)
            )
        with mlflow.start_run(run_id=run_id, nested=True):
            decision = register_adapter(
                cfg, source, str(adapter_dir), metrics, tags["dataset_digest"], tags.get("adapter_dtype", "bfloat16")
            )
    # Reopening the run to log the model into it moved its end; the trial's run ended when the trial did.
    MlflowClient().set_terminated(run_id, status="FINISHED", end_time=run.info.end_time)
    return decision
