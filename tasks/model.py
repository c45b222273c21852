"""Step `load-quantized-model` (qlora/model.py): the base in 4-bit on the training device."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from qlora.model import load_quantized_model
from qlora.model_source import ModelSource
from tasks.retries import retry_unless_input_error


@task(
    name="load-quantized-model",
    timeout_seconds=3600,  # a hung hub download fails and is retried instead of blocking the run
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_input_error,
)
def load_quantized_model_task(source: ModelSource, cfg: PipelineConfig, device: str):
    """Retried because the weight download can fail transiently. Never persisted or cached."""
    return load_quantized_model(
        source,
        cfg.quantization,
        device,
        cfg.training.attention,
        upcast_base_to_fp32=cfg.lora.upcast_base_to_fp32,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
    )
