"""Step `train-adapter` (qlora/train.py): SFTTrainer applies LoRA to the 4-bit base and trains it, in the flow's
process or, with `distributed` settings, in processes torchrun launches (qlora/distributed.py)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from qlora.distributed import TRAINED_ADAPTER_DIRNAME, run_distributed_training
from qlora.model import load_base_for_training, load_trained_adapter
from qlora.run_folder import RunFolder
from qlora.train import TrainResult, train_run
from tasks.retries import retry_unless_input_error


@task(
    name="train-adapter",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_input_error,
)
def train_adapter_task(
    model,
    data,
    tokenizer,
    cfg: PipelineConfig,
    device: str,
    run_folder: RunFolder,
    source=None,
    prepared=None,
    callbacks=None,
) -> TrainResult:
    """A retry (`training.task_retries`) continues from the newest complete checkpoint of this flow run's own
    folder, never from step 0 (one process: the failed attempt unloaded its adapter, so the same base is reused).

    `model` None: a distributed run. The processes train and rank 0 writes the adapter; the base is loaded here only
    afterwards, with that adapter, for evaluation (the GPUs are the training processes' until then).

    `callbacks`: more Trainer callbacks (a sweep trial's pruning check), in the flow's own process only."""
    log = get_run_logger()
    if model is not None:
        return train_run(
            model, data, tokenizer, cfg, device, str(run_folder.path), run_folder.fingerprint, log, callbacks
        )
    active = mlflow.active_run()
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    if active is not None:
        env |= {"MLFLOW_RUN_ID": active.info.run_id, "MLFLOW_EXPERIMENT_ID": active.info.experiment_id}
    result = run_distributed_training(cfg, source, prepared, run_folder.path, run_folder.fingerprint, device, env, log)
    base = load_base_for_training(source, cfg, device)
    trained = load_trained_adapter(base, Path(run_folder.path) / TRAINED_ADAPTER_DIRNAME, result["adapter_dtype"])
    return TrainResult(
        model=trained,
        metrics=result["metrics"],
        loss_history=[tuple(x) for x in result["loss_history"]],
        resumed_from=result["resumed_from"],
        adapter_dtype=result["adapter_dtype"],
    )
