"""Steps of the merge flow (qlora/merge.py, qlora/registry.py): load the adapter, merge and check it, register the
merged model, publish a summary."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qlora.inference import LoadedModel, load_for_inference
from qlora.merge import MergeResult, merge_adapter, merge_target
from qlora.registry import register_merged_model
from qlora.services import tracking_uri_or_default

MERGE_SUMMARY_ARTIFACT_KEY = "qlora-merge-summary"


@task(name="check-merge-target", cache_policy=NO_CACHE, persist_result=False)
def check_merge_target_task(output: str | None, max_loss_change_pct: float, min_agreement: float) -> Path:
    """Before any weights load: the new folder the merged model goes to. Raises PipelineInputError."""
    return merge_target(output, flow_run.get_name() or "local", max_loss_change_pct, min_agreement)


@task(name="load-adapter-model", cache_policy=NO_CACHE, persist_result=False)
def load_adapter_model_task(source: str, tracking_uri: str | None) -> LoadedModel:
    loaded = load_for_inference(source, tracking_uri_or_default(tracking_uri))
    get_run_logger().info("loaded %s (%s) from %s", loaded.kind, type(loaded.model).__name__, source)
    return loaded


@task(name="merge-adapter", cache_policy=NO_CACHE, persist_result=False)
def merge_adapter_task(
    loaded: LoadedModel, output_dir: Path, dtype: str, max_loss_change_pct: float, min_agreement: float
) -> MergeResult:
    """Not retried: a refusal (the check failed) is an answer, not a transient error."""
    result = merge_adapter(loaded, output_dir, dtype, max_loss_change_pct, min_agreement)
    get_run_logger().info(
        "merged into %s in %.0f s (peak %.0f MiB): %s",
        result.path,
        result.seconds,
        result.peak_memory_mib,
        result.check.describe(),
    )
    return result


@task(name="register-merged-model", cache_policy=NO_CACHE, persist_result=False)
def register_merged_model_task(
    result: MergeResult, loaded: LoadedModel, tracking_uri: str | None, flow_tags: dict[str, str]
) -> dict:
    mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri))
    registered = register_merged_model(result.path, loaded, asdict(result.check), flow_tags)
    get_run_logger().info("registered %s version %s", registered["name"], registered["version"])
    return registered


@task(name="publish-merge-summary", cache_policy=NO_CACHE, persist_result=False)
def publish_merge_summary_task(source: str, result: MergeResult, registered: dict) -> str:
    c = result.check
    markdown = "\n".join(
        [
            f"# Merged {source}",
            "",
            f"- folder: `{result.path}` ({result.dtype}, {result.seconds:.0f} s, "
            f"peak {result.peak_memory_mib:,.0f} MiB)",
            f"- registered: `models:/{registered['name']}/{registered['version']}`"
            if registered
            else "- not registered (register_model: false)",
            f"- eval loss: {c.reference_eval_loss:.4f} (base + adapter, 4-bit) -> {c.merged_eval_loss:.4f} (merged), "
            f"{c.loss_change_pct:+.3f}% (allowed +-{c.max_loss_change_pct}%) on {c.loss_rows} held-out rows",
            f"- greedy answers agree on {c.agreement:.0%} of {c.prompts} held-out prompts "
            f"(needed {c.min_agreement:.0%})",
        ]
    )
    create_markdown_artifact(markdown=markdown, key=MERGE_SUMMARY_ARTIFACT_KEY, description="merged model")
    return markdown
