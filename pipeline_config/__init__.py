"""Typed configuration of the QLoRA pipeline and its shipped YAML files."""

from pipeline_config.loading import (
    CONFIG_DIR,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    dump_pipeline_config,
    load_pipeline_config,
)
from pipeline_config.schema import PipelineConfig

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "PipelineConfig",
    "dump_pipeline_config",
    "load_pipeline_config",
]
