"""Step 10: Prefect artifacts of the run, with stable keys (shown on the flow run's page in the Prefect UI):
a markdown summary, a table of eval samples, and a link to the MLflow run."""

from __future__ import annotations

import hashlib

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig, dump_pipeline_config

SUMMARY_ARTIFACT_KEY = "qlora-summary"
SAMPLES_ARTIFACT_KEY = "qlora-eval-samples"
MLFLOW_LINK_ARTIFACT_KEY = "qlora-mlflow-run"
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` serves a local store here


def config_digest(cfg: PipelineConfig) -> str:
    return hashlib.sha256(dump_pipeline_config(cfg).encode()).hexdigest()[:16]


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    ui = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else LOCAL_MLFLOW_UI
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def summary_markdown(cfg: PipelineConfig, comparison, adapter_dir: str, digest: str, run_id: str, decision) -> str:
    base, tuned = comparison.base.metrics, comparison.finetuned.metrics
    rows = "\n".join(f"| {k} | {base[k]:.4f} | {tuned[k]:.4f} |" for k in base if k in tuned)
    lines = [
        f"# QLoRA fine-tune of `{cfg.model.name_or_path}` on `{cfg.data.source}`",
        f"- config digest: `{config_digest(cfg)}`",
        f"- data digest: `{digest}`",
        f"- adapter: `{adapter_dir}`",
        f"- MLflow run: `{run_id}`",
        "",
        "| metric | base | fine-tuned |",
        "| --- | --- | --- |",
        rows,
    ]
    if decision is not None:
        role = "champion" if decision.became_champion else "challenger"
        lines += ["", f"Registry: version {decision.version} is **{role}** ({decision.reason})."]
    return "\n".join(lines)


@task(name="publish-summary", cache_policy=NO_CACHE, persist_result=False)
def publish_summary_task(cfg, comparison, adapter_dir, digest, run, decision) -> str:
    from tasks.tracking import resolve_tracking_uri

    markdown = summary_markdown(cfg, comparison, adapter_dir, digest, run.info.run_id, decision)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY, description="base vs fine-tuned")
    if comparison.samples:
        create_table_artifact(table=comparison.samples, key=SAMPLES_ARTIFACT_KEY, description="held-out samples")
    url = mlflow_run_url(resolve_tracking_uri(cfg.tracking), run.info.experiment_id, run.info.run_id)
    create_link_artifact(link=url, link_text=f"MLflow run {run.info.run_id}", key=MLFLOW_LINK_ARTIFACT_KEY)
    return markdown
