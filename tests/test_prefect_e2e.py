"""End to end the way a user runs it: `prefect server start`, `prefect deploy` from prefect.yaml, a process worker;
then an API-triggered run and an event-triggered run, each to Completed, with their three artifacts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from qlora.bundled_data import generate_orders

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
ARTIFACT_KEYS = {"qlora-summary", "qlora-eval-samples", "qlora-mlflow-run"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture
def prefect_stack(tmp_path):
    """A real server on a free loopback port with a temporary PREFECT_HOME, the deployments, and a process worker."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PWD=str(REPO),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    procs = [
        _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "server.log")
    ]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(api + "/health", timeout=2):
                    break
            except OSError:
                assert procs[0].poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        k8s_pool = ["work-pool", "create", "qlora-k8s", "--type", "kubernetes"]
        k8s_pool += ["--base-job-template", str(REPO / "deploy" / "kubernetes-gpu-job-template.json")]
        process_pool = ["work-pool", "create", "qlora-process", "--type", "process"]
        for args in (process_pool, k8s_pool, ["--no-prompt", "deploy", "--all"]):
            done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        procs.append(
            _start(
                [PREFECT, "worker", "start", "--pool", "qlora-process", "--type", "process"],
                env,
                tmp_path / "worker.log",
            )
        )
        yield api, env
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _wait_final(client, flow_run_id, timeout_s: float = 420):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished in {timeout_s} s")


def _artifacts(client, flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {a.key: a for a in found}


def test_deployments_run_on_demand_and_on_dataset_event(prefect_stack, tiny_config_file, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env = prefect_stack
    sft_config, dpo_config = _sft_config_with_a_next_stage(tiny_config_file, tmp_path)
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        # (a) the on-demand deployment, triggered through the API with the tiny config (its next stage: DPO)
        deployment = client.read_deployment_by_name("qlora-finetune/qlora-default")
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"config_path": str(sft_config)})
        run = _wait_final(client, flow_run.id)
        assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
        artifacts = _artifacts(client, flow_run.id)
        assert ARTIFACT_KEYS <= set(artifacts)
        assert "| eval_loss |" in artifacts["qlora-summary"].data
        samples = json.loads(artifacts["qlora-eval-samples"].data)
        assert samples and {"prompt", "expected", "base_output", "finetuned_output"} <= set(samples[0])
        # the link opens MLflow's model-training view of the run, not its GenAI view
        assert "/#/experiments/" in artifacts["qlora-mlflow-run"].data
        assert "?workflowType=machine_learning)" in artifacts["qlora-mlflow-run"].data

        # (b) a dataset.updated event starts the event-triggered deployment on that file
        rows = generate_orders(40, 200, seed=5)["train"]
        data_file = tmp_path / "new-orders.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        triggered = client.read_deployment_by_name("qlora-finetune/qlora-on-dataset-update")
        emitted = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "emit-dataset-updated",
                str(data_file),
                "--config",
                str(tiny_config_file),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert emitted.returncode == 0, emitted.stderr[-2000:]
        deadline = time.monotonic() + 120
        while not (
            runs := client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[triggered.id]))
            )
        ):
            assert time.monotonic() < deadline, "no run started from the dataset.updated event"
            time.sleep(2)
        event_run = _wait_final(client, runs[0].id)
        assert event_run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
        assert event_run.parameters["data_source"] == str(data_file)
        assert event_run.parameters["config_path"] == str(tiny_config_file)
        assert ARTIFACT_KEYS <= set(_artifacts(client, runs[0].id))
        summary = _artifacts(client, runs[0].id)["qlora-summary"].data
        assert str(data_file) in summary

        # (c) (a)'s version became champion: its qlora.champion.promoted event started the next stage (DPO) through
        # the qlora-align deployment's trigger, from that version
        align = client.read_deployment_by_name("qlora-finetune/qlora-align")
        deadline = time.monotonic() + 120
        filter_align = DeploymentFilter(id=DeploymentFilterId(any_=[align.id]))
        while not (stage_runs := client.read_flow_runs(deployment_filter=filter_align)):
            assert time.monotonic() < deadline, "no qlora-align run started from the qlora.champion.promoted event"
            time.sleep(2)
        stage_run = _wait_final(client, stage_runs[0].id)
        assert stage_run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
        sft_name = yaml.safe_load(sft_config.read_text())["registry"]["model_name"]
        assert stage_run.parameters["config_path"] == str(dpo_config)
        assert stage_run.parameters["adapter"] == f"models:/{sft_name}/1"
        from mlflow.tracking import MlflowClient

        tracking = MlflowClient(yaml.safe_load(dpo_config.read_text())["tracking"]["tracking_uri"])
        version = tracking.get_model_version("tiny-dpo", "1")  # (promoted only if it beats its SFT start)
        assert version.tags["qlora.stage"] == "dpo" and version.tags["parent_version"] == "1"
        assert version.tags["parent_model"] == sft_name

        # (d) a run cancelled in the UI / API: the worker sends SIGTERM; training stops at its next step with a
        # checkpoint, the MLflow run ends KILLED, the flow run Cancelled, the folder unlocked and resumable
        _cancel_while_training(client, tiny_config_file, tmp_path)


def _sft_config_with_a_next_stage(tiny_config_file: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny config registering as `tiny-sft` with a DPO stage (tiny-dpo, two steps on the bundled preference
    pairs) as its next stage."""
    raw = yaml.safe_load(tiny_config_file.read_text())
    stage = json.loads(json.dumps(raw))
    stage["data"] = {"source": "bundled:orders-preference", "max_train_rows": 16, "max_eval_rows": 4}
    stage["training"].update(method="dpo", max_steps=2, output_dir=str(tmp_path / "dpo"))
    stage["registry"] = {"model_name": "tiny-dpo", "max_new_tokens": 8}
    dpo_config = tmp_path / "tiny-dpo.yaml"
    dpo_config.write_text(yaml.safe_dump(stage))
    raw["registry"] = {"model_name": "tiny-sft", "max_new_tokens": 8, "next_stages": [str(dpo_config)]}
    sft_config = tmp_path / "tiny-sft.yaml"
    sft_config.write_text(yaml.safe_dump(raw))
    return sft_config, dpo_config


def _cancel_while_training(client, tiny_config_file, tmp_path) -> None:
    import yaml
    from mlflow.tracking import MlflowClient
    from prefect.states import Cancelling

    from qlora.run_folder import RunLock

    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["training"].update(output_dir=str(tmp_path / "cancelled"), max_steps=200, save_steps=2, logging_steps=1)
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(raw))
    deployment = client.read_deployment_by_name("qlora-finetune/qlora-default")
    flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"config_path": str(config)})
    deadline = time.monotonic() + 300
    while not list((tmp_path / "cancelled").glob("*/checkpoint-2")):
        assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-4000:]
        time.sleep(0.5)
    client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by the test"), force=True)
    run = _wait_final(client, flow_run.id, timeout_s=120)
    assert run.state.type.value == "CANCELLED", (run.state, (tmp_path / "worker.log").read_text()[-4000:])
    (run_dir,) = (tmp_path / "cancelled").iterdir()
    mlflow = MlflowClient(raw["tracking"]["tracking_uri"])
    (mlflow_run,) = mlflow.search_runs(
        [mlflow.get_experiment_by_name(raw["tracking"]["experiment_name"]).experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'",
    )
    assert mlflow_run.info.status == "KILLED" and mlflow_run.data.tags["stopped_by"] == "SIGTERM"
    step = int(mlflow_run.data.tags["stopped_at_step"])
    assert (run_dir / f"checkpoint-{step}").is_dir() and step < 200
    lock = RunLock(run_dir)
    assert lock.acquire() and not (run_dir / "RUN_FINISHED").exists()
    lock.release()


def test_sweep_deployment_spreads_trials_over_the_worker_as_finetune_deployment_runs(
    prefect_stack, tiny_config_file, tmp_path
):
    """The `qlora-sweep` deployment with a 2-trial space: each trial a run of qlora-finetune/qlora-default that the
    worker picks up (a subflow run of the sweep), two at once because the GPU limit has two slots; the best one
    registered; the sweep's summary artifact lists both."""
    import yaml
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, _ = prefect_stack
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["training"].update(gpu_concurrency_limit="gpu-e2e", gpu_slots=1)
    raw["registry"] = {"model_name": "tiny-deployed-sweep", "max_new_tokens": 8}
    tiny_config_file.write_text(yaml.safe_dump(raw))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"parameters": {"lora.r": [4, 8]}, "metric": "finetuned_eval_loss"}))
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-e2e", limit=2))
        deployment = client.read_deployment_by_name("qlora-sweep/qlora-sweep")
        assert deployment.parameters["trial_deployment"] == "qlora-finetune/qlora-default"
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"config_path": str(tiny_config_file), "space_path": str(space)}
        )
        run = _wait_final(client, flow_run.id, timeout_s=600)
        assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
        trials_deployment = client.read_deployment_by_name("qlora-finetune/qlora-default")
        trials = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[trials_deployment.id]))
        )
        assert len(trials) == 2 and all(t.state.is_completed() for t in trials)
        for trial in trials:  # subflow runs of the sweep, through its run-trial tasks
            assert client.read_task_run(trial.parent_task_run_id).flow_run_id == flow_run.id
            assert trial.parameters["trial"]["study_name"] and "config" in trial.parameters
        (first, second) = sorted(trials, key=lambda t: t.start_time)
        assert second.start_time < first.end_time  # two slots: the worker ran them at the same time
        summary = _artifacts(client, flow_run.id)["qlora-sweep-summary"].data
    assert "**0 (best)**" in summary or "**1 (best)**" in summary
    mlflow = MlflowClient(raw["tracking"]["tracking_uri"])
    version = mlflow.get_model_version_by_alias("tiny-deployed-sweep", "champion")
    best = mlflow.get_run(version.run_id)
    parent = mlflow.get_run(best.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run.id) and parent.info.status == "FINISHED"
    assert best.data.tags["prefect.flow_run_id"] in {str(t.id) for t in trials}
