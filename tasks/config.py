"""Step 0: validate the configuration (and fail before anything heavy runs)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig, load_pipeline_config
from tasks.model_source import check_model_source


def validate_config(config_path: str | None, overrides: list[str] | None) -> PipelineConfig:
    """Load and validate the config, and check that the model source exists. Raises ConfigError/ModelSourceError."""
    cfg = load_pipeline_config(config_path, overrides)
    check_model_source(cfg.model)
    return cfg


@task(name="validate-config", cache_policy=NO_CACHE, persist_result=False)
def validate_config_task(config_path: str | None, overrides: list[str] | None) -> PipelineConfig:
    return validate_config(config_path, overrides)
