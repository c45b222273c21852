"""Steps `validate-config` and `resolve-model-source`: fail on bad input before anything heavy runs."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import ModelConfig, PipelineConfig, load_pipeline_config
from qlora.model_source import ModelSource, resolve_model_source
from tasks.retries import DOWNLOAD_STEP


@task(name="validate-config", cache_policy=NO_CACHE, persist_result=False)
def validate_config_task(
    config: PipelineConfig | None, config_path: str | None, overrides: list[str] | None, data_source: str | None
) -> PipelineConfig:
    """The run's validated config: `config` as given, else the file with its overrides; `data_source` replaces
    `data.source` (what a dataset.updated event passes). Raises ConfigError."""
    if config is None:
        config = load_pipeline_config(config_path, overrides)
    if data_source:
        config = load_pipeline_config(config.model_dump(mode="json"), {"data.source": data_source})
    return config


@task(name="resolve-model-source", **DOWNLOAD_STEP, retry_delay_seconds=[10, 60])
def resolve_model_source_task(model_cfg: ModelConfig) -> ModelSource:
    """Once per run: check the base model, convert a GGUF once (cached), digest its weights."""
    return resolve_model_source(model_cfg)
