"""Step 10: the run summary as a Prefect markdown artifact (shown on the flow run's page in the Prefect UI)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig

SUMMARY_ARTIFACT_KEY = "qlora-summary"


def summary_markdown(cfg: PipelineConfig, comparison, adapter_dir: str, digest: str, run_id: str, decision) -> str:
    base, tuned = comparison.base.metrics, comparison.finetuned.metrics
    rows = "\n".join(f"| {k} | {base[k]:.4f} | {tuned[k]:.4f} |" for k in base if k in tuned)
    lines = [
        f"# QLoRA fine-tune of `{cfg.model.name_or_path}` on `{cfg.data.source}`",
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
def publish_summary_task(cfg, comparison, adapter_dir, digest, run_id, decision) -> str:
    markdown = summary_markdown(cfg, comparison, adapter_dir, digest, run_id, decision)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY, description="base vs fine-tuned")
    return markdown
