"""Steps `evaluate-models` (qlora/evaluate.py): base (adapter off) vs fine-tuned on the held-out rows, and
`evaluate-suites` (qlora/suites.py): the lm-evaluation-harness suites of `evaluation.suites` on both; the evaluate
flow's `score-model` and `record-scores` (qlora/scoring.py)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipeline_config.evaluation import EvaluationConfig
from pipeline_config.schema import PipelineConfig
from qlora.evaluate import Comparison, evaluate_base_and_finetuned
from qlora.gate import evaluate_suites
from qlora.run_folder import RunFolder
from qlora.scoring import record_scores, score_model, sources_to_score
from qlora.services import tracking_uri_or_default
from qlora.suites import SuiteResult, comparison_rows
from tasks.retries import retry_unless_input_error

SCORES_ARTIFACT_KEY = "qlora-harness-scores"
# A run found the champion without scores of a suite's current version (the suite changed since it was scored and
# no guard had it scored now): the evaluate flow's `rescore-champion` deployment is triggered by it (prefect.yaml).
SUITE_CHANGED_EVENT = "qlora.suite.changed"


def suite_changed_event(cfg: PipelineConfig, results: list[SuiteResult], config_path: str) -> dict | None:
    """The `emit_event` arguments announcing the suites whose current version the champion has no scores of, or
    None when there are none (or no champion)."""
    from qlora.registry import default_model_name
    from qlora.suites import suite_version

    stale = {r.suite.name: suite_version(r) for r in results if r.champion_version and r.champion_scores is None}
    if not stale:
        return None
    name = cfg.registry.model_name or default_model_name(cfg)
    version = next(r.champion_version for r in results if r.champion_version)
    return {
        "event": SUITE_CHANGED_EVENT,
        "resource": {
            "prefect.resource.id": f"mlflow.registered-model.{name}",
            "prefect.resource.name": name,
            "qlora.model_uri": f"models:/{name}@champion",
            "qlora.config_path": config_path,
        },
        "payload": {"champion_version": version, "suite_versions": stale},
    }


@task(name="evaluate-models", cache_policy=NO_CACHE, persist_result=False)
def evaluate_models_task(peft_model, tokenizer, data, cfg: EvaluationConfig, max_len: int) -> Comparison:
    return evaluate_base_and_finetuned(peft_model, tokenizer, data, cfg, max_len)


@task(name="evaluate-suites", cache_policy=NO_CACHE, persist_result=False)
def evaluate_suites_task(peft_model, tokenizer, data, cfg: PipelineConfig, run_folder: RunFolder) -> list[SuiteResult]:
    """The harness suites on base and fine-tuned ([] when none is configured), and on the champion when a guard
    needs its scores; the offline tasks' documents are written into the run folder."""
    if not cfg.evaluation.suites:
        return []
    results = evaluate_suites(peft_model, tokenizer, data, cfg, run_folder.path / "suites")
    log = get_run_logger()
    for result in results:
        scored = f"; champion v{result.champion_version} scored too" if result.champion is not None else ""
        log.info("suite %s: %s%s", result.suite.name, ", ".join(sorted(result.finetuned["results"])), scored)
    config_path = (flow_run.get_parameters() or {}).get("config_path") or "pipeline_config/default.yaml"
    if event := suite_changed_event(cfg, results, str(config_path)):
        from prefect.events import emit_event

        emit_event(**event)
        log.info("%s: champion v%s has no scores of %s", SUITE_CHANGED_EVENT, event["payload"]["champion_version"],
                 ", ".join(event["payload"]["suite_versions"]))  # fmt: skip
    return results


@task(
    name="list-models-to-score",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_input_error,  # the store can fail transiently; a folder with all_versions cannot
)
def sources_to_score_task(model: str, all_versions: bool, tracking_uri: str | None) -> list[str]:
    """`model`, or every version of the registered model it names (qlora/scoring.py)."""
    mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri))
    return sources_to_score(model, all_versions)


@task(name="score-model", cache_policy=NO_CACHE, persist_result=False)
def score_model_task(loaded, cfg: PipelineConfig, folder: str) -> list[SuiteResult]:
    """The config's harness suites on any loaded model (qlora/scoring.py)."""
    results = score_model(loaded, cfg, Path(folder))
    for result in results:
        get_run_logger().info("suite %s: %s", result.suite.name, ", ".join(sorted(result.finetuned["results"])))
    return results


@task(name="record-scores", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=[5, 30])
def record_scores_task(source: str, results: list[SuiteResult], cfg: PipelineConfig, tracking_uri: str | None) -> dict:
    """An MLflow run of the scores, and the scores on the registry version (retried: the store can fail
    transiently)."""
    mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri))
    recorded = record_scores(source, results, cfg, {"prefect.flow_run_id": str(flow_run.get_id())})
    create_table_artifact(table=comparison_rows(results), key=SCORES_ARTIFACT_KEY, description=f"scores of {source}")
    return recorded
