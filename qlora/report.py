"""What the run's summary says: the markdown table of base vs fine-tuned and the link to the MLflow run
(published as Prefect artifacts by tasks/report.py)."""

from __future__ import annotations

import hashlib

from pipeline_config.schema import PipelineConfig, dump_pipeline_config

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
        "| metric | base | fine-tuned |",
        "| --- | --- | --- |",
        rows,
    ]
    if decision is not None:
        role = "champion" if decision.became_champion else "challenger"
        lines += ["", f"Registry: version {decision.version} is **{role}** ({decision.reason})."]
    return "\n".join(lines)
