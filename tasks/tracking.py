"""The flow run's MLflow run (qlora/tracking.py): opened around the steps, and the steps `log-dataset` and
`log-results`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipeline_config.schema import PipelineConfig
from qlora.tracking import log_dataset, log_results, tracking_run


@contextlib.contextmanager
def mlflow_run_of_flow_run(cfg: PipelineConfig, run_id: str | None = None, starting=None) -> Iterator:
    """One MLflow run per flow run, tagged with the flow run's id and its training stage (with the adapter a stage
    started from: `starting`); FAILED/KILLED if the flow fails. `run_id`: continue that run (a sweep's trial run)
    instead of starting one."""
    from qlora.registry import stage_tags

    tags = {"prefect.flow_run_id": str(flow_run.id or "none"), **stage_tags(cfg, starting)}
    with tracking_run(cfg, tags, run_id=run_id) as run:
        yield run


@task(name="log-dataset", cache_policy=NO_CACHE, persist_result=False)
def log_dataset_task(data) -> None:
    log_dataset(data)


@task(name="log-results", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=[5, 30])
def log_results_task(cfg: PipelineConfig, train_result, comparison, adapter_dir: str, suites=()) -> dict[str, float]:
    """Retried: the tracking server or artifact store can fail transiently."""
    return log_results(cfg, train_result, comparison, adapter_dir, suites)
