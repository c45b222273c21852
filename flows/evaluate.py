"""The evaluate flow: any model scored on the config's lm-evaluation-harness suites, the scores in MLflow and on the
registry version they belong to.

    qlora-flow evaluate --model models:/smollm2-135m-orders@champion [--config FILE] [--set ...]
    prefect deployment run qlora-evaluate/rescore-champion      (prefect.yaml: after a suite changes)

Steps: validate-config (suites, guards) -> load-adapter-model (qlora/inference.py: adapter folder, registry URI or
merged folder) -> score-model (adapter on, and off for its base; a merged model once) -> record-scores (an MLflow run
in the config's experiment; `metric.harness/...` and the suite version on a registered version's tags, which the
registry's gate compares challengers with).
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.runtime import flow_run
from prefect.utilities.annotations import opaque, quote

from tasks.config import validate_config_task
from tasks.evaluate import record_scores_task, score_model_task
from tasks.merge import load_adapter_model_task


@flow(name="qlora-evaluate")
def evaluate(
    model: str = "models:/smollm2-135m-orders@champion",
    config_path: str = "pipeline_config/default.yaml",
    overrides: list[str] | None = None,
    output_dir: str = "outputs/evaluations",
    tracking_uri: str | None = None,
) -> dict:
    """Score `model` on the suites of `config_path` (`evaluation.suites`) and record the scores.

    Args:
        model: an adapter folder, a merged model folder, or an MLflow model URI (models:/NAME@champion,
            models:/NAME/3, runs:/RUN_ID/model).
        config_path: the config whose evaluation.suites (and tracking) to use.
        overrides: `section.key=value` overrides of the config, validated with it; repeatable.
        output_dir: the offline tasks' documents go into a new folder of this run below it.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).
    """
    cfg = validate_config_task(None, config_path, overrides)
    loaded = load_adapter_model_task(model, tracking_uri, wait_for=[opaque(cfg)])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = f"{output_dir}/{stamp}-{flow_run.get_name() or 'local'}"
    results = score_model_task(opaque(loaded), quote(cfg), folder)
    recorded = record_scores_task(model, opaque(results), quote(cfg), tracking_uri)
    return {"model": model, **recorded}


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["evaluate", *__import__("sys").argv[1:]]))
