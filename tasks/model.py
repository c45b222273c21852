"""Step `load-quantized-model` (qlora/model.py): the base in 4-bit on the training device."""

from __future__ import annotations

from prefect import task

from pipeline_config.schema import PipelineConfig
from qlora.model import load_base_for_training
from qlora.model_source import ModelSource
from tasks.retries import DOWNLOAD_STEP


@task(name="load-quantized-model", **DOWNLOAD_STEP, retry_delay_seconds=[10, 60])
def load_quantized_model_task(source: ModelSource, cfg: PipelineConfig, device: str):
    """Retried because the weight download can fail transiently. Never persisted or cached."""
    return load_base_for_training(source, cfg, device)
