"""The evaluate flow: any model scored on the config's lm-evaluation-harness suites, the scores in MLflow and on the
registry version they belong to.

    qlora-flow evaluate --model models:/smollm2-135m-orders@champion [--config FILE] [--set ...]
    qlora-flow evaluate --model models:/smollm2-135m-orders@champion --all-versions     (every version of the model)
    prefect deployment run qlora-evaluate/rescore-champion      (prefect.yaml: triggered when a suite changes)

Steps: validate-config (suites, guards) -> list-models-to-score (the model, or every version of it) -> for each:
load-adapter-model (qlora/inference.py: adapter folder, registry URI or
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
from tasks.evaluate import record_scores_task, score_model_task, sources_to_score_task
from tasks.merge import load_adapter_model_task


@flow(name="qlora-evaluate")
def evaluate(
    model: str = "models:/smollm2-135m-orders@champion",
    config_path: str = "pipeline_config/default.yaml",
    overrides: list[str] | None = None,
    output_dir: str = "outputs/evaluations",
    tracking_uri: str | None = None,
    all_versions: bool = False,
) -> dict:
    """Score `model` on the suites of `config_path` (`evaluation.suites`) and record the scores.

    Args:
        model: an adapter folder, a merged model folder, or an MLflow model URI (models:/NAME@champion,
            models:/NAME/3, runs:/RUN_ID/model).
        config_path: the config whose evaluation.suites (and tracking) to use.
        overrides: `section.key=value` overrides of the config, validated with it; repeatable.
        output_dir: the offline tasks' documents go into a new folder of this run below it.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).
        all_versions: score every version of the registered model `model` names, not only that one.
    """
    cfg = validate_config_task(None, config_path, overrides)
    sources = sources_to_score_task(model, all_versions, tracking_uri, wait_for=[opaque(cfg)])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    scored = []
    for index, source in enumerate(sources):  # one at a time: each loads its own base
        loaded = load_adapter_model_task(source, tracking_uri)
        folder = f"{output_dir}/{stamp}-{flow_run.get_name() or 'local'}/{index}"
        results = score_model_task(opaque(loaded), quote(cfg), folder)
        scored.append({"model": source, **record_scores_task(source, opaque(results), quote(cfg), tracking_uri)})
        del loaded, results  # the next version's model loads into the memory this one leaves
    return {"model": model, "scored": scored}


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["evaluate", *__import__("sys").argv[1:]]))
