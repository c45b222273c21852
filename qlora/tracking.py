"""Provenance in one place: the MLflow run of a flow run, its params, tags, dataset inputs, metrics and artifacts.

One MLflow run per flow run. The run is opened by `tracking_run` around the flow's tasks; an exception inside
marks it FAILED (a graceful stop or KeyboardInterrupt: KILLED, with the step reached), so a failed flow never leaves
it RUNNING.
"""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from pipeline_config.loading import dump_pipeline_config
from pipeline_config.schema import PipelineConfig
from qlora.policy_pairs import ANSWERS_FILE
from qlora.provenance import git_commit, library_versions, process_alive, process_identity
from qlora.save import adapter_checksum
from qlora.services import resolve_tracking_uri
from qlora.stop import RunInterrupted


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialize check-then-write steps (create the store, the experiment, a registered model version and its
    aliases) among the runs of this host that share a local SQLite store: started together, two runs would both
    create the tables, or both find no experiment and create it (a UNIQUE violation). An OS file lock, so a crashed
    holder never blocks. A tracking server does this itself."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        yield


# The experiment's kind, as MLflow records it (its API and UI read the tag; the 3.17 UI picks its view from the
# page's `workflowType` instead, which the links this project prints carry: qlora/report.py). Our runs train models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def model_training_experiment(name: str, artifact_location: str | None = None):
    """The experiment `name` (set active), created if missing, with the model-training kind unless someone chose
    another. The caller holds `store_lock`."""
    if mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
            )
        except MlflowException as exc:  # another run created it on the tracking server a moment ago
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # created before this tag was set, or by someone else
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment


def open_experiment(cfg: PipelineConfig):
    """The configured experiment, created (with its artifact location) if missing."""
    uri = resolve_tracking_uri(cfg.tracking)
    mlflow.set_tracking_uri(uri)
    location = cfg.tracking.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    with store_lock(uri):
        return model_training_experiment(cfg.tracking.experiment_name, location)


def config_params(cfg: PipelineConfig) -> dict[str, object]:
    """The resolved config as MLflow params ('section.key' -> value; unset values as '')."""
    return {k: "" if v is None else v for k, v in cfg.to_flat_dict().items()}


@contextlib.contextmanager
def tracking_run(
    cfg: PipelineConfig,
    orchestrator_tags: dict[str, str] | None = None,
    run_id: str | None = None,
    params: dict[str, object] | None = None,
    system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of this flow run: resolved config as params, provenance as tags (plus
    `orchestrator_tags`, e.g. the Prefect flow run id).

    `run_id`: continue that run instead of starting one (a sweep's trial run, which the sweep created with the
    trial's params; a resumed sweep's own run). `params`: log these instead of the resolved config.
    `system_metrics`: overrides `tracking.system_metrics`."""
    experiment = open_experiment(cfg)
    output_dir = str(Path(cfg.training.output_dir).resolve())
    close_interrupted_runs(experiment.experiment_id)
    me = process_identity()
    tags = {
        # MLflow would put $MLFLOW_TRACKING_USERNAME here: a credential, so name the OS user instead.
        "mlflow.user": getpass.getuser(),
        **(orchestrator_tags or {}),
        "output_dir": output_dir,
        "git_commit": git_commit(),
        "base_model": cfg.model.name_or_path,
        **{f"version.{k}": v for k, v in library_versions().items()},
        # Who writes this run: the closer below leaves a run alone while this process lives.
        "process.pid": str(me["pid"]),
        "process.host": me["host"],
        "process.start_time": repr(me["start_time"]),
    }
    mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval_s)
    run = mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else cfg.tracking.run_name,
        tags=tags,
        log_system_metrics=cfg.tracking.system_metrics if system_metrics is None else system_metrics,
    )
    try:
        mlflow.log_params(config_params(cfg) if params is None else params)
        yield run
    except (KeyboardInterrupt, RunInterrupted) as exc:
        with contextlib.suppress(Exception):  # the stop must not wait on a tracking server that is down
            tags = {"killed_reason": str(exc) or type(exc).__name__}
            if isinstance(exc, RunInterrupted) and exc.step is not None:
                tags |= {"stopped_at_step": str(exc.step), "stopped_by": exc.signal_name}
            mlflow.set_tags(tags)
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def close_interrupted_runs(experiment_id: str) -> list[str]:
    """Mark RUNNING runs whose process is gone as KILLED; returns their ids, newest first.

    A run is closed only when its writer (tags process.pid / process.host / process.start_time) ran on this host
    and no longer lives. A run of a live process, of another host, or without those tags is left alone: it may
    still be writing."""
    client = mlflow.MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", order_by=["attributes.start_time DESC"]
    )
    closed = []
    for run in running:
        tags = run.data.tags
        if "process.pid" not in tags:
            continue
        writer = {k: tags.get(f"process.{k}") for k in ("pid", "host", "start_time")}
        if process_alive(writer) is not False:
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        client.set_tag(run.info.run_id, "killed_reason", "its process ended without closing the run (found later)")
        closed.append(run.info.run_id)
    return closed


def log_dataset(data) -> None:
    """Train and held-out rows as MLflow dataset inputs, with the content digest."""
    for ctx, ds in (("training", data.train), ("evaluation", data.eval)):
        # An explicit source: the default one copies the run context, which can hold the tracking user name.
        dataset = mlflow.data.from_huggingface(
            ds, name=f"{data.source}:{ctx}", digest=data.digest, source=CodeDatasetSource(tags={"source": data.source})
        )
        mlflow.log_input(dataset, context=ctx)
    mlflow.set_tag("dataset_digest", data.digest)


def loss_curve_figure(loss_history: list[tuple[int, float]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if loss_history:
        steps, losses = zip(*loss_history, strict=True)
        ax.plot(steps, losses, marker="o", markersize=3)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def log_results(cfg: PipelineConfig, train_result, comparison, adapter_dir: str, suites=()) -> dict[str, float]:
    """Metrics of base vs fine-tuned and of training, the harness suites' results (qlora/suites.py), loss curve,
    eval samples, adapter folder and resolved config. Returns the metrics it logged."""
    metrics = {f"base_{k}": v for k, v in comparison.base.metrics.items()}
    metrics |= {f"finetuned_{k}": v for k, v in comparison.finetuned.metrics.items()}
    metrics |= train_result.metrics
    mlflow.log_metrics(metrics)
    if suites:
        from qlora.suites import log_suite_results

        metrics |= log_suite_results(suites)
    mlflow.set_tag(
        "resumed_from_checkpoint", Path(train_result.resumed_from).name if train_result.resumed_from else "none"
    )
    mlflow.log_artifacts(adapter_dir, artifact_path="adapter")
    mlflow.set_tags(
        {"adapter_sha256": adapter_checksum(Path(adapter_dir)), "adapter_dtype": train_result.adapter_dtype}
    )
    answers = Path(adapter_dir).parent / ANSWERS_FILE  # the run folder's: a DPO stage's preference.policy_rejected
    if answers.is_file():
        mlflow.log_artifact(str(answers), artifact_path="stage")
    mlflow.log_text(dump_pipeline_config(cfg), "pipeline_config.yaml")
    if comparison.samples:
        columns = {key: [row[key] for row in comparison.samples] for key in comparison.samples[0]}
        mlflow.log_table(columns, artifact_file="eval_samples.json")
    fig = loss_curve_figure(train_result.loss_history, f"{cfg.model.name_or_path} on {cfg.data.source}")
    mlflow.log_figure(fig, "loss_curve.png")
    mlflow.set_tag("adapter_dir", str(Path(adapter_dir).resolve()))
    return metrics
