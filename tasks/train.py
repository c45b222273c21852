"""Step `train-adapter` (qlora/train.py): SFTTrainer applies LoRA to the 4-bit base and trains it."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from qlora.run_folder import RunFolder
from qlora.train import TrainResult, train_adapter
from tasks.retries import retry_unless_input_error


@task(
    name="train-adapter",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_input_error,
)
def train_adapter_task(model, data, tokenizer, cfg: PipelineConfig, device: str, run_folder: RunFolder) -> TrainResult:
    """A retry (`training.task_retries`) gets the same base model back (a failed attempt unloads its adapter) and
    continues from the newest complete checkpoint of this flow run's own folder, never from step 0."""
    return train_adapter(
        model,
        data,
        tokenizer,
        cfg.lora,
        cfg.training,
        device,
        report_to_mlflow=True,
        run_dir=str(run_folder.path),
        fingerprint=run_folder.fingerprint,
        log=get_run_logger(),
    )
