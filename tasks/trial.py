"""Step of a sweep's trial inside the finetune flow (a plain fine-tune imports it, never the sweep's steps)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from qlora.trial import SweepTrial, trial_callbacks


@task(name="prepare-trial-pruning", cache_policy=NO_CACHE, persist_result=False)
def prepare_trial_pruning_task(trial: SweepTrial, data, tokenizer, cfg: PipelineConfig) -> list:
    """In a sweep's trial (the finetune flow): the Trainer callback that reports the eval loss to the sweep's study
    every few steps and stops the trial when the pruner judges it hopeless (none when the sweep does not prune)."""
    # get_run_logger, called when the callback logs: the train-adapter step's run log
    return trial_callbacks(trial, data, tokenizer, cfg, get_run_logger)
