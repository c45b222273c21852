"""What the run's summary says: the markdown table of base vs fine-tuned and the link to the MLflow run
(published as Prefect artifacts by tasks/report.py)."""

from __future__ import annotations

import hashlib

from pipeline_config.loading import dump_pipeline_config
from pipeline_config.schema import PipelineConfig

LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` serves a local store here


def config_digest(cfg: PipelineConfig) -> str:
    return hashlib.sha256(dump_pipeline_config(cfg).encode()).hexdigest()[:16]


# MLflow's UI (3.17) shows an experiment in its GenAI view (traces, evaluation runs) unless the page's
# `workflowType` says otherwise (or the user flipped the GenAI / Model training switch, kept in the browser): the
# experiment's `mlflow.experimentKind` tag (qlora/tracking.py) does not choose the view. Links carry it.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    ui = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else LOCAL_MLFLOW_UI
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


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
        f"| metric | {'starting adapter' if cfg.model.adapter else 'base'} | fine-tuned |",
        "| --- | --- | --- |",
        rows,
    ]
    if decision is not None:
        role = "champion" if decision.became_champion else "challenger"
        lines += ["", f"Registry: version {decision.version} is **{role}** ({decision.reason})."]
    return "\n".join(lines)


def run_summary_text(summary: dict, tracking_uri: str, wall_s: float) -> str:
    """What `qlora-flow run` prints when the flow has finished: metrics, where everything went, how to use it."""
    base, tuned = summary["base"], summary["finetuned"]
    lines = ["", "=== QLoRA fine-tuning summary ==="]
    lines.append(f"{'metric':<20}{'before':>12}{'fine-tuned':>12}")
    for key in ("exact_match", "json_valid", "field_accuracy/date", "eval_loss", "perplexity"):
        if key in base:
            lines.append(f"{key:<20}{base[key]:>12.3f}{tuned[key]:>12.3f}")
    t = summary["train"]
    lines.append(
        f"training: {t['train_steps']:.0f} steps, {t['train_tokens_per_s']:.0f} tokens/s, "
        f"peak memory {t['train_peak_memory_mib']:.0f} MiB on {summary['device']}"
    )
    lines.append(f"run folder: {summary['run_dir']} ({summary['run_dir_reason']})")
    lines.append(f"adapter: {summary['adapter_dir']}")
    lines.append(
        f"MLflow run: {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment_id']}) in {tracking_uri}"
    )
    lines.append(f"  browse: mlflow ui --backend-store-uri {tracking_uri}")
    if summary.get("registry"):
        reg = summary["registry"]
        role = "champion" if reg["became_champion"] else "challenger"
        lines.append(f"registered: {summary['registered_model']} v{reg['version']} -> {role} ({reg['reason']})")
        # the version this run registered: a challenger has no champion alias (there may be none at all)
        alias = "@champion" if reg["became_champion"] else f"/{reg['version']}"
        lines.append(f"  ask it: qlora-flow generate --model models:/{summary['registered_model']}{alias} --prompt ...")
    lines.append(f"flow wall time: {wall_s:.0f} s")
    return "\n".join(lines)
