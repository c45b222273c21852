"""Step `publish-summary`: Prefect artifacts of the run, with stable keys (shown on the flow run's page in the
Prefect UI): a markdown summary, a table of eval samples, the harness suites' table (base vs fine-tuned, one row per
task and metric, regressions marked) and a link to the MLflow run."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from qlora.report import mlflow_run_url, summary_markdown
from qlora.services import resolve_tracking_uri
from qlora.suites import comparison_rows

SUMMARY_ARTIFACT_KEY = "qlora-summary"
SAMPLES_ARTIFACT_KEY = "qlora-eval-samples"
MLFLOW_LINK_ARTIFACT_KEY = "qlora-mlflow-run"
SUITES_ARTIFACT_KEY = "qlora-harness-suites"


@task(name="publish-summary", cache_policy=NO_CACHE, persist_result=False)
def publish_summary_task(cfg, comparison, adapter_dir, digest, run, decision, suites=()) -> str:
    markdown = summary_markdown(cfg, comparison, adapter_dir, digest, run.info.run_id, decision)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY, description="base vs fine-tuned")
    if comparison.samples:
        create_table_artifact(table=comparison.samples, key=SAMPLES_ARTIFACT_KEY, description="held-out samples")
    if suites:
        create_table_artifact(
            table=comparison_rows(suites), key=SUITES_ARTIFACT_KEY, description="harness suites: base vs fine-tuned"
        )
    url = mlflow_run_url(resolve_tracking_uri(cfg.tracking), run.info.experiment_id, run.info.run_id)
    create_link_artifact(link=url, link_text=f"MLflow run {run.info.run_id}", key=MLFLOW_LINK_ARTIFACT_KEY)
    return markdown
