"""Step `claim-run-folder` (qlora/run_folder.py): this flow run's own folder, locked until the flow ends, and
finished only when every step after it succeeded."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import opaque, quote

from pipeline_config.schema import PipelineConfig
from qlora.model_source import ModelSource
from qlora.run_folder import (
    RunFolder,
    claim_run_folder,
    end_lost_attempt,
    lost_attempts,
    mark_finished,
    run_fingerprint,
)

LOST_STATES = ("RUNNING", "PENDING", "CANCELLING")  # a flow run in one of these whose process is gone never ends


def report_lost_flow_runs(root: str, log) -> list[str]:
    """Flow runs whose process died in a run folder under `root` (SIGKILL, a lost machine) without telling Prefect
    stay Running forever: set them Crashed, saying so. Returns their ids."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    reported = []
    lost = lost_attempts(root)
    if not lost:
        return reported
    with get_client(sync_client=True) as client:
        for folder, attempt in lost:
            run_id = attempt.get("flow_run_id")
            note = "no flow run"
            if run_id:
                try:
                    state = client.read_flow_run(run_id).state
                except ObjectNotFound:  # another Prefect server's run (a temporary one's database is another)
                    state = None
                note = f"flow run was {state.type.value if state else 'unknown to this server'}"
                if state is not None and state.type.value in LOST_STATES:
                    message = (
                        f"its process (pid {attempt.get('pid')} on {attempt.get('host')}) ended without reporting, in "
                        f"run folder {folder.name}; found by flow run {flow_run.name}"
                    )
                    client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                    log.warning("flow run %s (%s): marked Crashed: %s", attempt.get("flow_run_name"), run_id, message)
                    reported.append(run_id)
                    note = "marked Crashed"
            end_lost_attempt(folder, attempt, note)
    return reported


@task(name="claim-run-folder", cache_policy=NO_CACHE, persist_result=False)
def claim_run_folder_task(
    cfg: PipelineConfig, source: ModelSource, data_digest: str, resume_dir: str | None
) -> RunFolder:
    """Report flow runs that died in earlier run folders, fingerprint this run, claim its folder, say why in the run
    log, and tag the MLflow run with it."""
    log = get_run_logger()
    report_lost_flow_runs(cfg.training.output_dir, log)
    name = flow_run.name or f"local-{os.getpid()}"
    fingerprint = run_fingerprint(cfg, data_digest, source.digest or "")
    identity = {"flow_run_id": str(flow_run.id or ""), "flow_run_name": name}
    folder = claim_run_folder(cfg.training.output_dir, fingerprint, name, identity, cfg.training.resume, resume_dir)
    folder.begin_attempt(identity)
    log.info("run folder %s (%s)", folder.path, folder.reason)
    if (active := mlflow.active_run()) is not None:
        tags = {"run_dir": str(folder.path.resolve()), "run_dir_reason": folder.reason}
        if folder.continues_mlflow_run_id:
            tags["continues_run_id"] = folder.continues_mlflow_run_id
        mlflow.set_tags(tags)
        folder.record_mlflow_run(active.info.run_id)
    return folder


@contextlib.contextmanager
def claimed_run_folder(cfg, source, data_digest: str, resume_dir: str | None) -> Iterator:
    """The flow's hold on its run folder: released when the flow ends (or by the kernel, if the process dies). The
    folder is marked finished only when the block succeeds: a failure after training (evaluation, saving,
    registration) leaves it resumable, and the re-run continues from its trained adapter."""
    folder = claim_run_folder_task(quote(cfg), opaque(source), opaque(data_digest), resume_dir)
    try:
        yield folder
        mark_finished(folder.path)
    finally:
        folder.release()
