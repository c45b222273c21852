"""Secrets come from the environment or a Prefect Secret block and never land in anything a run writes."""

from __future__ import annotations

import uuid

import pytest
import yaml
from mlflow.tracking import MlflowClient

import tasks  # noqa: F401  (registers the Prefect Secret block reader)
from flows.finetune import finetune
from pipeline_config.schema import ModelConfig
from qlora.model_source import hub_token

pytestmark = pytest.mark.slow


def test_hub_token_from_env_then_secret_block(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    block = f"hub-token-{uuid.uuid4().hex[:8]}"
    Secret(value="hf_from_block_123").save(block)
    cfg = ModelConfig(name_or_path="x/y", hub_token_env="TEST_HUB_TOKEN", hub_token_secret_block=block)
    monkeypatch.delenv("TEST_HUB_TOKEN", raising=False)
    assert hub_token(cfg) == "hf_from_block_123"
    monkeypatch.setenv("TEST_HUB_TOKEN", "hf_from_env_456")
    assert hub_token(cfg) == "hf_from_env_456"
    assert hub_token(ModelConfig(name_or_path="x/y", hub_token_env="TEST_UNSET_TOKEN")) is None


def test_no_secret_in_anything_a_run_writes(prefect_server, tiny_config_file, tmp_path, monkeypatch, capfd):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    secrets = {
        "HF_TOKEN": "hf_SECRETtoken" + uuid.uuid4().hex,
        "MLFLOW_TRACKING_USERNAME": "user" + uuid.uuid4().hex,
        "MLFLOW_TRACKING_PASSWORD": "pw" + uuid.uuid4().hex,
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)

    summary = finetune(config_path=str(tiny_config_file))

    written = [capfd.readouterr()]
    for path in tmp_path.rglob("*"):  # MLflow database and artifacts, checkpoints, adapter, resolved config
        if path.is_file():
            written.append(path.read_bytes().decode("utf-8", errors="ignore"))
    cfg = yaml.safe_load(tiny_config_file.read_text())
    run = MlflowClient(cfg["tracking"]["tracking_uri"]).get_run(summary["mlflow_run_id"])
    written += [str(run.data.params), str(run.data.tags)]
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        written.append("\n".join(log.message for log in logs))
        written.append(str(client.read_flow_run(flow_run_id).parameters))
    assert any(log.message.startswith("preflight:") for log in logs)  # task logs did reach the server
    assert any(log.message.startswith("step 6/6 loss ") and " ETA " in log.message for log in logs)
    blob = "\n".join(str(w) for w in written)
    for key, value in secrets.items():
        assert value not in blob, f"{key} leaked"
