"""Steps `validate-config` and `resolve-model-source`: fail on bad input before anything heavy runs."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import ModelConfig
from qlora.model_source import ModelSource, resolve_model_source
from qlora.run_config import settle_run_config
from tasks.retries import DOWNLOAD_STEP

# The run's validated config, with the run parameters that replace settings settled into it (MLflow then logs what
# the run does). Raises ConfigError.
validate_config_task = task(name="validate-config", cache_policy=NO_CACHE, persist_result=False)(settle_run_config)


@task(name="resolve-model-source", **DOWNLOAD_STEP, retry_delay_seconds=[10, 60])
def resolve_model_source_task(model_cfg: ModelConfig) -> ModelSource:
    """Once per run: check the base model, convert a GGUF once (cached), digest its weights."""
    return resolve_model_source(model_cfg)
