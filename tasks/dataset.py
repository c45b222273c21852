"""Steps `prepare-dataset` (cached across flow runs) and `open-prepared-dataset` (qlora/prepare.py)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import DataConfig, TrainingConfig
from qlora.data import DatasetSplits
from qlora.prepare import PreparedDataset, dataset_cache_key, open_prepared, prepare_dataset
from tasks.retries import retry_unless_input_error


@task(
    name="prepare-dataset",
    cache_key_fn=dataset_cache_key,
    persist_result=True,
    timeout_seconds=3600,  # a hung hub download fails and is retried instead of blocking the run
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_input_error,
)
def prepare_dataset_task(cfg: DataConfig, tokenizer, train_cfg: TrainingConfig) -> PreparedDataset:
    """Cached across flow runs (qlora/prepare.py); returns a reference to Arrow files, never rows or models."""
    return prepare_dataset(cfg, dataset_cache_key(None, {"cfg": cfg, "tokenizer": tokenizer, "train_cfg": train_cfg}))


@task(name="open-prepared-dataset", cache_policy=NO_CACHE, persist_result=False)
def open_prepared_dataset_task(ref: PreparedDataset, cfg: DataConfig) -> DatasetSplits:
    """Verified first: a prepared copy found missing or damaged is rebuilt, and the run log says so."""
    return open_prepared(ref, cfg, get_run_logger())
