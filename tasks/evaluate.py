"""Step `evaluate-models` (qlora/evaluate.py): base (adapter off) vs fine-tuned on the held-out rows."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import EvaluationConfig
from qlora.evaluate import Comparison, evaluate_base_and_finetuned


@task(name="evaluate-models", cache_policy=NO_CACHE, persist_result=False)
def evaluate_models_task(peft_model, tokenizer, data, cfg: EvaluationConfig, max_len: int) -> Comparison:
    return evaluate_base_and_finetuned(peft_model, tokenizer, data, cfg, max_len)
