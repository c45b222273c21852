"""The whole flow under a real (test-harness) Prefect server, tracked in a temporary SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from peft import PeftModel
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.finetune import finetune
from pipeline_config.loading import load_pipeline_config
from qlora.data import load_dataset_splits
from qlora.evaluate import eval_loss, scored_examples
from qlora.model import load_quantized_model
from qlora.model_source import resolve_model_source
from qlora.tokenizer import setup_tokenizer
from tests.conftest import task_graph
from tests.test_suites import OFFLINE_SUITE

pytestmark = pytest.mark.slow


# The run's graph in the Prefect UI: each step drawn from the steps whose results it uses (flows/finetune.py passes
# those `opaque` and the config `quote`), the first one waiting for validate-config. Before, the config travelling
# whole through the steps tied each step to nearly every other.
STEP_INPUTS = {
    "resolve-model-source": {"validate-config"},
    "setup-tokenizer": {"resolve-model-source"},
    "prepare-dataset": {"setup-tokenizer"},
    "open-prepared-dataset": {"prepare-dataset"},
    "preflight": {"resolve-model-source", "setup-tokenizer", "open-prepared-dataset"},
    "log-dataset": {"open-prepared-dataset"},
    "claim-run-folder": {"resolve-model-source", "open-prepared-dataset"},
    "load-quantized-model": {"resolve-model-source"},
    "train-adapter": {
        "resolve-model-source",
        "setup-tokenizer",
        "prepare-dataset",
        "open-prepared-dataset",
        "claim-run-folder",
        "load-quantized-model",
    },
    "evaluate-models": {"setup-tokenizer", "open-prepared-dataset", "train-adapter"},
    "evaluate-suites": {"setup-tokenizer", "open-prepared-dataset", "claim-run-folder", "train-adapter"},
    "save-adapter": {"setup-tokenizer", "claim-run-folder", "train-adapter"},
    "log-results": {"train-adapter", "evaluate-models", "evaluate-suites", "save-adapter"},
    "register-adapter": {
        "resolve-model-source",
        "open-prepared-dataset",
        "train-adapter",
        "evaluate-suites",
        "save-adapter",
        "log-results",
    },
    "publish-summary": {
        "open-prepared-dataset",
        "evaluate-models",
        "evaluate-suites",
        "save-adapter",
        "register-adapter",
    },
}


def test_flow_records_run_and_adapter_reproduces_eval_loss(prefect_server, tiny_config_file, tmp_path):
    summary = finetune(config_path=str(tiny_config_file), overrides=[OFFLINE_SUITE], resume="never")
    cfg = load_pipeline_config(tiny_config_file)
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])

    assert run.info.status == "FINISHED"
    # the MLflow UI opens the experiment in its model-training view, not the GenAI one
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    params = run.data.params
    assert params["lora.r"] == "8" and params["training.max_steps"] == "6" and params["data.source"] == "bundled:orders"
    assert params["model.name_or_path"] == cfg.model.name_or_path
    metrics = run.data.metrics
    for key in ("eval_loss", "perplexity", "exact_match"):
        assert f"base_{key}" in metrics and f"finetuned_{key}" in metrics
    assert metrics["train_tokens_per_s"] > 0 and metrics["train_peak_memory_mib"] > 0
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3  # logging every 2 of 6 steps
    assert params["training.resume"] == "never"  # the run parameter, settled into the config the run logs
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] not in ("", "none") and len(tags["git_commit"]) >= 7
    # the harness suite: every task's metrics for base and fine-tuned, results JSON, samples, versions
    for prefix in ("harness", "base_harness"):
        assert metrics[f"{prefix}/qlora_general_text/bits_per_byte"] > 0
        assert 0 <= metrics[f"{prefix}/qlora_heldout/exact_match"] <= 1
        assert f"{prefix}/qlora_heldout/exact_match_stderr" in metrics
    assert (
        metrics["harness/qlora_general_text/bits_per_byte"] != metrics["base_harness/qlora_general_text/bits_per_byte"]
    )
    suite_files = {a.path for a in client.list_artifacts(run.info.run_id, "harness/offline")}
    assert {"harness/offline/finetuned_results.json", "harness/offline/base_qlora_heldout_samples.json"} <= suite_files
    assert tags["harness.lm_eval_version"] == lm_eval.__version__ and len(tags["harness.suite_version.offline"]) == 12
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[tags["prefect.flow_run_id"]]))
        )
    table = json.loads(next(a.data for a in artifacts if a.key == "qlora-harness-suites"))
    assert {(r["task"], r["metric"]) for r in table} >= {
        ("qlora_heldout", "exact_match"),
        ("qlora_general_text", "bits_per_byte"),
    }
    assert task_graph(tags["prefect.flow_run_id"]) == {(up, step) for step, ups in STEP_INPUTS.items() for up in ups}
    assert tags["dataset_digest"] == summary["dataset_digest"]
    inputs = run.inputs.dataset_inputs
    assert {i.dataset.digest for i in inputs} == {summary["dataset_digest"]}
    assert {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"} == {"training", "evaluation"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
        "adapter/pipeline_config.yaml",
    } <= artifacts
    assert "pipeline_config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # The logged adapter, downloaded and put back onto a fresh 4-bit base, reproduces the logged eval loss.
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="adapter",
            dst_path=str(tmp_path / "dl"),
            tracking_uri=cfg.tracking.tracking_uri,
        )
    )
    assert yaml.safe_load((local / "pipeline_config.yaml").read_text())["lora"]["r"] == 8
    data = load_dataset_splits(cfg.data)
    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
    base = load_quantized_model(source, cfg.quantization, "cpu")
    reloaded = PeftModel.from_pretrained(base, local).eval()
    examples = scored_examples(data, tokenizer, cfg.evaluation.max_loss_rows, cfg.training.max_seq_length)
    loss = eval_loss(reloaded, tokenizer, examples, cfg.evaluation.batch_size)
    assert loss == pytest.approx(metrics["finetuned_eval_loss"], rel=2e-3)
    assert loss < metrics["base_eval_loss"]


def test_failed_flow_marks_mlflow_run_failed(prefect_server, tiny_config_file, tmp_path, monkeypatch):
    """A failure after the MLflow run opened (here: in evaluation) ends that run FAILED, never RUNNING."""
    from qlora import evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke (test)")

    monkeypatch.setattr(evaluate, "evaluate_model", broken)
    with pytest.raises(Exception, match="evaluation broke"):
        finetune(config_path=str(tiny_config_file))
    cfg = load_pipeline_config(tiny_config_file)
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_bad_data_fails_the_flow_before_an_mlflow_run_opens(prefect_server, tiny_config_file, tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"body": "no usable column"}\n' * 4)
    with pytest.raises(Exception, match="cannot tell the format"):
        finetune(config_path=str(tiny_config_file), overrides=[f"data.source={bad}"])
    assert not (tmp_path / "mlflow.db").exists()


def test_disk_full_while_saving_fails_cleanly(prefect_server, tiny_config_file, tmp_path, monkeypatch, capsys):
    import errno

    import peft.peft_model

    from flows.cli import main

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    code = main(["run", "--config", str(tiny_config_file), "--set", "training.save_steps=0"])

    err = capsys.readouterr().err
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if (p / "run.json").is_file()]
    # the first adapter written is the trained one, kept in the run folder for a re-run (exit 1: not bad input)
    assert code == 1 and f"disk full while writing the trained adapter in {run_dir}" in err and "Traceback" not in err
    assert not (run_dir / "adapter").exists() and not (run_dir / "RUN_FINISHED").exists()
    assert not (run_dir / "trained-adapter").exists() and not (run_dir / "train-result.json").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no half-written temp folder left
    cfg = load_pipeline_config(tiny_config_file)
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "adapter_sha256" not in runs[0].data.tags
