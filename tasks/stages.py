"""Step `resolve-starting-adapter` (qlora/stages.py): the adapter a stage after SFT starts from, resolved once per
run (a registry alias pinned to its version, the version downloaded into a folder of this run's own)."""

from __future__ import annotations

from prefect import task

from pipeline_config.schema import PipelineConfig
from qlora.stages import StartingAdapter, resolve_starting_adapter
from tasks.retries import DOWNLOAD_STEP


@task(name="resolve-starting-adapter", **DOWNLOAD_STEP, retry_delay_seconds=[10, 60])
def resolve_starting_adapter_task(cfg: PipelineConfig) -> StartingAdapter | None:
    """None for a run that starts from the bare base. Bad input (no such adapter, another base) is not retried."""
    return resolve_starting_adapter(cfg)
