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
from qlora.scoring import record_scores, score_model
from qlora.services import tracking_uri_or_default
from qlora.suites import SuiteResult, comparison_rows

SCORES_ARTIFACT_KEY = "qlora-harness-scores"


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
        scored = f"; champion v{result.champion_version} scored too" if result.champion_version else ""
        log.info("suite %s: %s%s", result.suite.name, ", ".join(sorted(result.finetuned["results"])), scored)
    return results


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
