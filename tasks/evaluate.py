"""Steps `evaluate-models` (qlora/evaluate.py): base (adapter off) vs fine-tuned on the held-out rows, and
`evaluate-suites` (qlora/suites.py): the lm-evaluation-harness suites of `evaluation.suites` on both."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline_config.evaluation import EvaluationConfig
from pipeline_config.schema import PipelineConfig
from qlora.evaluate import Comparison, evaluate_base_and_finetuned
from qlora.gate import evaluate_suites
from qlora.run_folder import RunFolder
from qlora.suites import SuiteResult


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
