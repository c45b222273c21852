"""What a sweep's trial needs inside its finetune run, and nothing else of the sweep: which trial it is
(`SweepTrial`, the flow's `trial` parameter), and the Trainer callback that reports its eval loss to the sweep's
Optuna study and stops it when the pruner says so.

A plain fine-tune imports this module (for the parameter's type) but never Optuna or the sweep machinery
(qlora/sweep.py): Optuna is imported only when a trial's callbacks are built. The study's journal storage, the pruner
and the trial lookup live here because the trial reaches its study through them; qlora/sweep.py uses them too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from pydantic import BaseModel
from transformers import TrainerCallback

from pipeline_config.schema import PipelineConfig, PruningConfig

if TYPE_CHECKING:
    import optuna

STUDY_JOURNAL = "study.journal"
PRUNED_TAG = "sweep.pruned_at_step"  # set on a trial's MLflow run when its pruner stopped it
INTERMEDIATE_METRIC = "sweep_eval_loss"  # the eval loss a trial reports while it trains (MLflow metric, by step)


class SweepTrial(BaseModel):
    """A finetune flow run's part in a sweep (its `trial` parameter, so it travels to a deployment's worker):
    which Optuna trial it is, where the study is, and the MLflow run the sweep created for it."""

    sweep_dir: str
    study_name: str
    number: int
    mlflow_run_id: str
    pruning: PruningConfig


def journal_storage(sweep_dir: str | Path) -> optuna.storages.JournalStorage:
    """The study's storage: an append-only journal file in the sweep folder, which the sweep and trials running in
    other processes (on workers that see the folder) write with a file lock."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(Path(sweep_dir) / STUDY_JOURNAL)))


def build_pruner(cfg: PruningConfig) -> optuna.pruners.BasePruner:
    import optuna

    common = dict(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(**common)
    if cfg.pruner == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile, **common)
    return optuna.pruners.NopPruner()


def trial_handle(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> optuna.trial.Trial:
    """The live Optuna trial `number` of `study` (to report to, prune, set attributes on and tell), looked up
    through the storage's public API; `Trial(study, id)` is how Optuna itself hands a trial to an objective."""
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


class ReportEvalLossToStudy(TrainerCallback):
    """Every `every_steps` optimizer steps: the eval loss on the first held-out rows (qlora.evaluate.eval_loss, the
    same loss the run reports at the end), reported to the trial's Optuna study and logged to its MLflow run as
    `sweep_eval_loss`; training stops when the study's pruner judges the trial hopeless."""

    def __init__(self, trial: optuna.trial.Trial, examples, tokenizer, batch_size: int, every_steps: int, logger=None):
        self.trial, self.examples, self.tokenizer = trial, examples, tokenizer
        self.batch_size, self.every_steps = batch_size, every_steps
        # A function that returns the logger of the moment: the callback runs inside the training step, whose run
        # log it belongs in, not in that of the step that built it.
        self.logger = logger or (lambda: logging.getLogger(__name__))
        self.pruned_at_step: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every_steps or model is None:
            return
        from qlora.evaluate import eval_loss
        from qlora.integrations.bnb_cpu import no_inference_repacking

        was_training = model.training
        model.eval()
        try:
            with no_inference_repacking(model):  # training goes on after this: keep the weights' training layout
                loss = eval_loss(model, self.tokenizer, self.examples, self.batch_size)
        finally:
            model.train(was_training)
        self.trial.report(loss, step)
        if mlflow.active_run() is not None:
            mlflow.log_metric(INTERMEDIATE_METRIC, loss, step=step)
        if self.trial.should_prune():
            self.pruned_at_step = step
            control.should_training_stop = True
            if mlflow.active_run() is not None:
                mlflow.set_tag(PRUNED_TAG, str(step))
            self.logger().info("pruned at step %d: eval loss %.4f is hopeless next to the earlier trials", step, loss)
        else:
            self.logger().info("step %d: eval loss %.4f reported to the sweep", step, loss)


def trial_callbacks(trial: SweepTrial, data, tokenizer, cfg: PipelineConfig, logger=None) -> list[TrainerCallback]:
    """The Trainer callbacks of a sweep's trial: the eval-loss report and pruning check when the sweep prunes.
    None for a training in several processes (torchrun), which cannot take callbacks from the flow. `logger`: a
    function returning the logger to report to."""
    if trial.pruning.pruner == "none":
        return []
    from qlora.distributed import is_distributed
    from qlora.evaluate import scored_examples
    from qlora.model import pick_device

    if is_distributed(cfg, pick_device(cfg.training.device)):
        (logger or (lambda: logging.getLogger(__name__)))().warning("distributed training: this trial is not pruned")
        return []
    import optuna

    storage = journal_storage(trial.sweep_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A sampler that does nothing on load: this process only reports and asks the pruner.
    study = optuna.load_study(
        study_name=trial.study_name,
        storage=storage,
        pruner=build_pruner(trial.pruning),
        sampler=optuna.samplers.RandomSampler(),
    )
    examples = scored_examples(data, tokenizer, trial.pruning.eval_rows, cfg.training.max_seq_length)
    handle = trial_handle(study, storage, trial.number)
    every = trial.pruning.eval_every_steps
    return [ReportEvalLossToStudy(handle, examples, tokenizer, cfg.evaluation.batch_size, every, logger)]
