"""Step `claim-run-folder` (qlora/run_folder.py): this flow run's own folder, locked until the flow ends."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipeline_config.schema import PipelineConfig
from qlora.model_source import ModelSource
from qlora.run_folder import RunFolder, claim_run_folder, run_fingerprint


@task(name="claim-run-folder", cache_policy=NO_CACHE, persist_result=False)
def claim_run_folder_task(
    cfg: PipelineConfig, source: ModelSource, data_digest: str, resume: str | None, resume_dir: str | None
) -> RunFolder:
    """Fingerprint this run, claim its folder, say why in the run log, and tag the MLflow run with it."""
    name = flow_run.name or f"local-{os.getpid()}"
    fingerprint = run_fingerprint(cfg, data_digest, source.digest or "")
    identity = {"flow_run_id": str(flow_run.id or ""), "flow_run_name": name}
    folder = claim_run_folder(cfg, fingerprint, name, identity, resume, resume_dir)
    get_run_logger().info("run folder %s (%s)", folder.path, folder.reason)
    if (active := mlflow.active_run()) is not None:
        tags = {"run_dir": str(folder.path.resolve()), "run_dir_reason": folder.reason}
        if folder.continues_mlflow_run_id:
            tags["continues_run_id"] = folder.continues_mlflow_run_id
        mlflow.set_tags(tags)
        folder.record_mlflow_run(active.info.run_id)
    return folder


@contextlib.contextmanager
def claimed_run_folder(cfg, source, data_digest: str, resume: str | None, resume_dir: str | None) -> Iterator:
    """The flow's hold on its run folder: released when the flow ends (or by the kernel, if the process dies)."""
    folder = claim_run_folder_task(cfg, source, data_digest, resume, resume_dir)
    try:
        yield folder
    finally:
        folder.release()
