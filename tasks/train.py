"""Step `train-adapter` (qlora/train.py): SFTTrainer applies LoRA to the 4-bit base and trains it, in the flow's
process or, with `distributed` settings, in processes torchrun launches (qlora/distributed.py)."""

from __future__ import annotations

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from qlora.distributed import run_distributed_training
from qlora.model import load_base_for_training
from qlora.run_folder import RunFolder, set_aside_damaged_checkpoints
from qlora.train import TrainResult, read_training_outcome, save_training_outcome, train_run, trained_result
from tasks.retries import retry_if_transient


@task(
    name="train-adapter",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
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
    starting=None,
) -> TrainResult:
    """Train, or pick up what an earlier attempt in this run folder left:

    - training finished there (its trained adapter and result are in the folder, intact): no training; the adapter
      is loaded onto the base for the steps after it (an earlier attempt failed in evaluation, saving or
      registration);
    - else training continues from the newest intact checkpoint (a damaged one is set aside, and the log says which
      file was damaged), or starts at step 0.

    A retry (`training.task_retries`) happens only for what a retry can fix (a lost process, a service outage) and
    continues the same way. `model` None: a distributed run. The processes train and rank 0 writes the adapter; the
    base is loaded here only afterwards (the GPUs are the training processes' until then). `callbacks`: more Trainer
    callbacks (a sweep trial's pruning check), in the flow's own process only. `starting`: the adapter a stage after
    SFT starts from (qlora/stages.py)."""
    log = get_run_logger()
    folder = run_folder.path
    if (outcome := read_training_outcome(folder)) is not None:
        log.info(
            "training had finished in this run folder (%.0f steps): continuing with its trained adapter",
            outcome["metrics"].get("train_steps", 0),
        )
        base = model if model is not None else load_base_for_training(source, cfg, device)
        return trained_result(base, folder, outcome, starting)
    for line in set_aside_damaged_checkpoints(folder):
        log.warning("%s", line)
    if model is not None:
        result = train_run(
            model, data, tokenizer, cfg, device, str(folder), run_folder.fingerprint, log, callbacks, starting
        )
        save_training_outcome(result, folder)
        return result
    active = mlflow.active_run()
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    if active is not None:
        env |= {"MLFLOW_RUN_ID": active.info.run_id, "MLFLOW_EXPERIMENT_ID": active.info.experiment_id}
    starts = run_distributed_training(cfg, source, prepared, folder, run_folder.fingerprint, device, env, log, starting)
    if starts and active is not None:  # Ray Train: the worker group's restarts after lost workers, and from where
        restarts = starts[1:]
        mlflow.log_metric("ray_worker_group_restarts", len(restarts))
        if restarts:
            resumed = ", ".join(s["resumed_from"] or "step 0" for s in restarts)
            mlflow.set_tag("ray_restarts_resumed_from", resumed)
            log.warning("Ray restarted the worker group %d time(s); training continued from %s", len(restarts), resumed)
    outcome = read_training_outcome(folder)
    if outcome is None:
        raise RuntimeError(f"the training processes ended without leaving their result in {folder}")
    return trained_result(load_base_for_training(source, cfg, device), folder, outcome, starting)
