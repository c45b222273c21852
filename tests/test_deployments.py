"""prefect.yaml: every deployment's entrypoint and parameters validate, and the schedule's cron parses."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.schemas.schedules import CronSchedule
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.flows import load_flow_from_entrypoint

from flows.deployments import DATASET_EVENT, deployment_specs
from pipeline_config.schema import load_pipeline_config

REPO = Path(__file__).resolve().parent.parent
SPECS = deployment_specs()


def test_the_four_deployments_exist():
    names = {s["name"] for s in SPECS}
    assert names == {"qlora-default", "qlora-nightly", "qlora-on-dataset-update", "llama2-7b-chat-guanaco-gpu"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["name"])
def test_entrypoint_and_parameters_validate(spec):
    flow = load_flow_from_entrypoint(str(REPO / spec["entrypoint"]))
    params = flow.validate_parameters(spec["parameters"])
    cfg = load_pipeline_config(REPO / params["config_path"], params["overrides"])
    assert cfg.model.name_or_path
    for schedule in spec.get("schedules", []):
        cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert cron.timezone == "Europe/Berlin"
    for trigger in spec.get("triggers", []):
        parsed = DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"})
        assert parsed.expect == {DATASET_EVENT}
        assert set(parsed.parameters) == {"data_source", "config_path"}


def test_gpu_deployment_uses_its_own_queue():
    gpu = next(s for s in SPECS if s["name"] == "llama2-7b-chat-guanaco-gpu")
    assert gpu["work_pool"]["work_queue_name"] == "gpu"
    assert all(s["work_pool"]["work_queue_name"] == "default" for s in SPECS if s is not gpu)
