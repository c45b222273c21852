"""Flow runs that overlap, as a schedule and an event trigger do in production: two `python -m flows.finetune`
processes started together with the same config, against one Prefect server and one MLflow store.

- Without a GPU limit they train at the same time, each in its own run folder: neither continues the other's
  checkpoints, and each logged adapter reproduces its own logged eval loss on its own data.
- With a one-slot `gpu` limit they queue: their training never overlaps, and the second says how long it waited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from peft import PeftModel

from pipeline_config.loading import load_pipeline_config
from qlora.bundled_data import generate_orders
from qlora.data import load_dataset_splits
from qlora.evaluate import eval_loss, scored_examples
from qlora.model import load_quantized_model
from qlora.model_source import resolve_model_source
from qlora.tokenizer import setup_tokenizer
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _write_config(tiny_llama_dir, tmp_path, registry: dict, **training) -> Path:
    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["training"].update(max_steps=12, save_steps=2, logging_steps=2, **training)
    raw["registry"] = registry
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _other_data(tmp_path) -> str:
    """Other chats than the bundled default (another generator seed), as a user's JSONL file."""
    path = tmp_path / "new.jsonl"
    rows = generate_orders(80, 0, seed=99)["train"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _start_together(config: Path, overrides: list[list[str]]) -> list[subprocess.CompletedProcess]:
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.finetune", "--config", str(config), *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in overrides
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out))
    return results


def _runs(config: Path) -> list:
    cfg = load_pipeline_config(config)
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _training_window(client, run) -> tuple[int, int]:
    stamps = [m.timestamp for m in client.get_metric_history(run.info.run_id, "loss")]
    return min(stamps), max(stamps)


def _flow_run_state(flow_run_id: str) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def test_two_overlapping_runs_each_train_and_log_their_own_adapter(prefect_server, tiny_llama_dir, tmp_path):
    registry = {"model_name": "tiny-overlap", "metric": "finetuned_eval_loss", "greater_is_better": False}
    config = _write_config(tiny_llama_dir, tmp_path, registry, gpu_slots=0)
    other = _other_data(tmp_path)
    results = _start_together(config, [[], ["--set", f"data.source={other}"]])
    assert [r.returncode for r in results] == [0, 0], [r.stdout[-3000:] for r in results]

    client, runs = _runs(config)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    (a_start, a_end), (b_start, b_end) = (_training_window(client, r) for r in runs)
    assert a_start < b_end and b_start < a_end  # they really trained at the same time

    run_dirs = {r.data.tags["run_dir"] for r in runs}
    assert len(run_dirs) == 2 and {str(Path(d).parent) for d in run_dirs} == {str(tmp_path / "out")}
    for run in runs:
        tags = run.data.tags
        assert tags["resumed_from_checkpoint"] == "none"
        assert tags["run_dir_reason"].startswith("fresh run folder")
        assert _flow_run_state(tags["prefect.flow_run_id"]) == "COMPLETED"
        record = json.loads((Path(tags["run_dir"]) / "run.json").read_text())
        assert record["flow_run_id"] == tags["prefect.flow_run_id"] and record["mlflow_run_ids"] == [run.info.run_id]
        assert Path(tags["adapter_dir"]).parent == Path(tags["run_dir"])

    # Each logged adapter, on a fresh 4-bit base, reproduces the eval loss its own run logged on its own data.
    sources = {"bundled:orders": [], other: [f"data.source={other}"]}
    for run in runs:
        cfg = load_pipeline_config(config, sources[run.data.params["data.source"]])
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="adapter",
            dst_path=str(tmp_path / run.info.run_id),
            tracking_uri=cfg.tracking.tracking_uri,
        )
        data = load_dataset_splits(cfg.data)
        assert data.digest == run.data.tags["dataset_digest"]
        source = resolve_model_source(cfg.model)
        tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
        model = PeftModel.from_pretrained(load_quantized_model(source, cfg.quantization, "cpu"), local).eval()
        examples = scored_examples(data, tokenizer, cfg.evaluation.max_loss_rows, cfg.training.max_seq_length)
        loss = eval_loss(model, tokenizer, examples, cfg.evaluation.batch_size)
        assert loss == pytest.approx(run.data.metrics["finetuned_eval_loss"], rel=2e-3)
    assert runs[0].data.metrics["finetuned_eval_loss"] != runs[1].data.metrics["finetuned_eval_loss"]

    # Both registered a version of their own run; different data, so each is champion of its own data only once.
    versions = client.search_model_versions("name = 'tiny-overlap'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    for version in versions:
        assert version.tags["adapter_sha256"] == client.get_run(version.run_id).data.tags["adapter_sha256"]
    champion = client.get_model_version_by_alias("tiny-overlap", "champion")
    assert champion.version in {v.version for v in versions}


def test_runs_queue_for_the_gpu_slot(prefect_server, tiny_llama_dir, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    limit = f"gpu-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    config = _write_config(tiny_llama_dir, tmp_path, {"enabled": False}, gpu_concurrency_limit=limit, gpu_slots=1)
    results = _start_together(config, [[], ["--set", "data.max_train_rows=48"]])
    assert [r.returncode for r in results] == [0, 0], [r.stdout[-3000:] for r in results]

    client, runs = _runs(config)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    (a_start, a_end), (b_start, b_end) = sorted(_training_window(client, r) for r in runs)
    assert a_end < b_start  # one at a time
    waits = sorted(r.data.metrics["gpu_slot_wait_s"] for r in runs)
    assert waits[0] < 5 and waits[1] > 5  # the second waited for the first to finish
    log = "".join(r.stdout for r in results)
    assert f"waiting for 1 slot(s) of the global concurrency limit '{limit}'" in log
