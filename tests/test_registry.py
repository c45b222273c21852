"""MLflow model registry: versions, champion/challenger aliases, hand promotion, and loading the champion back
in a fresh process from a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.finetune import finetune
from pipeline_config.loading import load_pipeline_config
from qlora.data import load_dataset_splits
from tests.conftest import free_port, wait_for_http

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
LOSS_RULE = [
    "registry.metric=finetuned_eval_loss",
    "registry.greater_is_better=false",
    "registry.model_name=tiny-orders",
]


def _aliases(client, name):
    return {a: str(client.get_model_version_by_alias(name, a).version) for a in ("champion", "challenger")}


def test_champion_moves_only_for_better_runs_on_the_same_data(prefect_server, tiny_config_file, capsys):
    cfg = load_pipeline_config(tiny_config_file)
    client = MlflowClient(cfg.tracking.tracking_uri)

    def run(*overrides):
        return finetune(config_path=str(tiny_config_file), overrides=[*LOSS_RULE, *overrides])

    first = run("training.max_steps=2")
    assert first["registry"]["became_champion"] and first["registry"]["reason"] == "no champion yet"
    assert _aliases(client, "tiny-orders") == {"champion": "1", "challenger": "1"}

    better = run("training.max_steps=12")
    assert better["finetuned"]["eval_loss"] < first["finetuned"]["eval_loss"]
    assert _aliases(client, "tiny-orders") == {"champion": "2", "challenger": "2"}

    worse = run("training.max_steps=1")
    assert worse["finetuned"]["eval_loss"] > better["finetuned"]["eval_loss"]
    assert _aliases(client, "tiny-orders") == {"champion": "2", "challenger": "3"}
    tags = client.get_run(worse["mlflow_run_id"]).data.tags
    assert tags["registry.decision"] == "challenger" and "does not beat champion v2" in tags["registry.reason"]
    metrics = client.get_run(worse["mlflow_run_id"]).data.metrics
    assert metrics["registry.champion_metric"] == pytest.approx(better["finetuned"]["eval_loss"], rel=1e-5)

    other_data = run("training.max_steps=24", "data.seed=99")
    assert other_data["dataset_digest"] != better["dataset_digest"]
    assert _aliases(client, "tiny-orders") == {"champion": "2", "challenger": "4"}
    assert "another dataset digest" in other_data["registry"]["reason"]

    v2 = client.get_model_version("tiny-orders", "2")
    assert v2.tags["dataset_digest"] == better["dataset_digest"] and v2.tags["base_model_digest"]
    assert v2.tags["base_model_path"] == str(Path(cfg.model.name_or_path).resolve())
    assert len(v2.tags["git_commit"]) >= 7 and v2.tags["version.peft"] and v2.tags["adapter_sha256"]
    assert float(v2.tags["metric.finetuned_eval_loss"]) == pytest.approx(better["finetuned"]["eval_loss"], rel=1e-5)

    run_artifacts = {a.path for a in client.list_artifacts(better["mlflow_run_id"])}
    assert {"loss_curve.png", "eval_samples.json"} <= run_artifacts
    assert any(k.startswith("system/") for k in client.get_run(better["mlflow_run_id"]).data.metrics)

    assert (
        main(["promote", "tiny-orders", "3", "--reason", "manual pick", "--tracking-uri", cfg.tracking.tracking_uri])
        == 0
    )
    assert _aliases(client, "tiny-orders")["champion"] == "3"
    assert client.get_model_version("tiny-orders", "3").tags["promoted_by_hand_reason"] == "manual pick"
    capsys.readouterr()
    assert main(["promote", "tiny-orders", "99", "--reason", "x", "--tracking-uri", cfg.tracking.tracking_uri]) == 2


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for_http(url + "/health", proc, timeout_s=120), "mlflow server did not come up"
        yield url
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def test_champion_served_by_mlflow_server_loads_in_a_fresh_process(prefect_server, tiny_config_file, mlflow_server):
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["tracking"] = {"tracking_uri": mlflow_server, "experiment_name": "over-http"}
    raw["registry"] = {"model_name": "tiny-http", "max_new_tokens": raw["evaluation"]["max_new_tokens"]}
    tiny_config_file.write_text(yaml.safe_dump(raw))

    summary = finetune(config_path=str(tiny_config_file))
    assert summary["registry"]["became_champion"]
    cfg = load_pipeline_config(tiny_config_file)
    prompt = load_dataset_splits(cfg.data).eval[0]["messages"][:-1]
    assert summary["samples"][0]["prompt"] == prompt[-1]["content"]

    script = (
        "import json, sys, mlflow\n"
        f"mlflow.set_tracking_uri({mlflow_server!r})\n"
        "model = mlflow.pyfunc.load_model('models:/tiny-http@champion')\n"
        "print('ANSWER=' + json.dumps(model.predict([json.loads(sys.argv[1]), 'Hello'])))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(prompt)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.split("ANSWER=")[-1])
    assert answer[0] == summary["samples"][0]["finetuned_output"]

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "generate",
            "--model",
            "models:/tiny-http@champion",
            "--prompt",
            "Hello",
            "--tracking-uri",
            mlflow_server,
            "--max-new-tokens",
            str(raw["registry"]["max_new_tokens"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    # one prompt streams its answer: the same greedy text the served pyfunc gives
    assert cli.stdout.strip() == answer[1] and answer[1]
