"""Deployments of the finetune flow, read from prefect.yaml, for `qlora-flow serve` (one machine, no worker),
and the `dataset.updated` event that triggers re-training."""

from __future__ import annotations

from pathlib import Path

import yaml

from qlora.model_source import file_digest

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
DATASET_EVENT = "dataset.updated"


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict]:
    return yaml.safe_load(path.read_text())["deployments"]


def runner_deployments(include_gpu: bool = False) -> list:
    """prefect.yaml's deployments on the process pool as Prefect runner deployments (schedules and triggers
    included), for `serve`: Kubernetes ones run on the cluster's worker, the GPU one only when asked."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    deployments = []
    for spec in deployment_specs():
        if spec["work_pool"]["name"] != "qlora-process":
            continue  # a Kubernetes job runs on the cluster's worker, not in this process
        if spec["work_pool"].get("work_queue_name") == "gpu" and not include_gpu:
            continue
        flow = load_flow_from_entrypoint(str(REPO_ROOT / spec["entrypoint"]))
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                parameters=spec.get("parameters", {}),
                schedules=[
                    Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                    for s in spec.get("schedules", [])
                ]
                or None,
                triggers=[
                    DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
                    for t in spec.get("triggers", [])
                ]
                or None,
            )
        )
    return deployments


def serve_deployments(include_gpu: bool = False) -> None:
    """Serve the prefect.yaml deployments from this process (schedules and triggers included)."""
    from prefect import serve

    serve(*runner_deployments(include_gpu))


def emit_dataset_updated(path: str, config_path: str = "pipeline_config/default.yaml") -> str:
    """Emit `dataset.updated` for a local data file; the event-triggered deployment trains on it. Returns the id."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    from qlora.errors import DataError, PipelineInputError
    from qlora.services import prefect_api_problem

    data_path = Path(path).resolve()
    if not data_path.is_file():
        raise DataError(f"{path}: no such data file")
    api_url = PREFECT_API_URL.value()
    if not api_url:  # a temporary server would take the event and vanish with it
        raise PipelineInputError(
            "emit-dataset-updated needs the Prefect server the deployments run on: set PREFECT_API_URL (`make server` "
            "starts one at http://127.0.0.1:4200/api)"
        )
    if problem := prefect_api_problem(api_url):
        raise PipelineInputError(problem)
    digest = file_digest(data_path)[:16]
    event = emit_event(
        event=DATASET_EVENT,
        resource={
            "prefect.resource.id": f"dataset.{data_path.name}",
            "prefect.resource.name": data_path.name,
            "dataset.path": str(data_path),
            "dataset.digest": digest,
            "qlora.config_path": config_path,
        },
    )
    EventsWorker.drain_all()  # send before this short-lived process exits
    if event is None:
        raise RuntimeError("Prefect did not accept the event: is PREFECT_API_URL set to a running server?")
    return str(event.id)
