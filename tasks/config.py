"""Steps `validate-config` and `resolve-model-source`: fail on bad input before anything heavy runs."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import ModelConfig, PipelineConfig
from qlora.model_source import ModelSource, resolve_model_source
from qlora.run_config import settle_run_config
from tasks.retries import DOWNLOAD_STEP


@task(name="validate-config", cache_policy=NO_CACHE, persist_result=False)
def validate_config_task(
    config: PipelineConfig | None,
    config_path: str | None,
    overrides: list[str] | None,
    data_source: str | None = None,
    resume: str | None = None,
    resume_dir: str | None = None,
) -> PipelineConfig:
    """The run's validated config: `config` as given, else the file with its overrides. The run parameters that
    replace settings are settled into it here, so what MLflow logs is what the run does: `data_source` replaces
    `data.source` (what a dataset.updated event passes), `resume` replaces `training.resume`. Raises ConfigError."""
    return settle_run_config(config, config_path, overrides, data_source, resume, resume_dir)


@task(name="resolve-model-source", **DOWNLOAD_STEP, retry_delay_seconds=[10, 60])
def resolve_model_source_task(model_cfg: ModelConfig) -> ModelSource:
    """Once per run: check the base model, convert a GGUF once (cached), digest its weights."""
    return resolve_model_source(model_cfg)
