"""Score any model on the harness suites and record the scores: `qlora-flow evaluate` and the `qlora-evaluate` flow
(its deployment re-scores the champion when a suite changes).

A SOURCE (qlora/inference.py: an adapter folder, a registry URI, a merged folder) is loaded once; an adapter is
scored with its adapter on and, for the comparison, off (its 4-bit base); a merged model once. The scores go to an
MLflow run (the same metrics, artifacts and tags as a training run's) and, for a registered version, onto the
version's tags, which is what the registry's gate (qlora/gate.py) compares a challenger with.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient

from pipeline_config.schema import PipelineConfig
from qlora.gate import score_tags
from qlora.suites import SuiteResult, log_suite_results, run_suites


def sources_to_score(model: str, all_versions: bool) -> list[str]:
    """`model` alone, or with `all_versions` every version of the registered model it names (oldest first)."""
    from qlora.errors import PipelineInputError
    from qlora.registry import source_registry_version

    if not all_versions:
        return [model]
    registered = source_registry_version(model) if model.startswith("models:/") else None
    if registered is None:
        raise PipelineInputError(
            f"all_versions needs a registered model (models:/NAME@ALIAS or models:/NAME/VERSION), not {model!r}"
        )
    name = registered[0]
    versions = sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))
    return [f"models:/{name}/{v}" for v in versions]


def score_model(loaded, cfg: PipelineConfig, folder: Path) -> list[SuiteResult]:
    """`cfg`'s suites on the loaded model; the held-out task reads the model's own run's data where it has one."""
    from qlora.data import load_dataset_splits

    data_cfg = loaded.config.data if loaded.config is not None else cfg.data
    data = load_dataset_splits(data_cfg)
    return run_suites(loaded.model, loaded.tokenizer, cfg.evaluation.suites, data, folder)


def record_scores(source: str, results: list[SuiteResult], cfg: PipelineConfig, run_tags: dict[str, str]) -> dict:
    """An MLflow run of the scores in the config's experiment, and the scores on the registry version `source`
    names (if it names one). Returns {run_id, metrics, version}."""
    from qlora.registry import source_registry_version
    from qlora.tracking import model_training_experiment, store_lock

    with store_lock(mlflow.get_tracking_uri()):
        experiment = model_training_experiment(cfg.tracking.experiment_name)
    registered = source_registry_version(source) if source.startswith("models:/") else None
    tags = {"qlora.kind": "evaluation", "evaluated_model": source, **run_tags}
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=f"evaluate {source}", tags=tags) as run:
        metrics = log_suite_results(results)
    if registered:
        client = MlflowClient()
        for key, value in {k: v for r in results for k, v in score_tags(r, r.finetuned).items()}.items():
            client.set_model_version_tag(*registered, key, value)
    return {"run_id": run.info.run_id, "metrics": metrics, "version": "/".join(registered) if registered else None}
