"""The QLoRA fine-tuning flow.

    qlora-flow run --config pipeline_config/default.yaml [--set training.max_steps=10 ...]
    python -m flows.finetune --config pipeline_config/default.yaml

Steps, in order (each a task in tasks/, each over plain functions in qlora/):
  validate-config -> resolve-model-source -> setup-tokenizer -> prepare-dataset (cached) -> open-prepared-dataset
  -> preflight -> resolve-starting-adapter (a stage that starts from an earlier adapter: `model.adapter`)
  -> [MLflow run] log-dataset -> claim-run-folder (this run's own folder, locked)
  -> [GPU slot] load-quantized-model -> train-adapter (TRL's trainer of `training.method`: SFT, DPO, KTO or GRPO;
  SFTTrainer applies LoRA) -> evaluate-models (base vs fine-tuned) -> evaluate-suites (lm-evaluation-harness
  suites, base vs fine-tuned) -> save-adapter -> log-results -> register-adapter -> publish-summary; the run folder
  is marked finished only then (a failure after training leaves it to resume from its trained adapter)
SIGTERM, SIGINT or a cancellation stop training at the next optimizer step with a checkpoint (tasks/stopping.py).
As a sweep's trial (flows/sweep.py passes `trial`), prepare-trial-pruning comes before the MLflow run, which is
the one the sweep created for the trial; train-adapter then reports its eval loss to the sweep and may stop early.
Models travel between tasks in memory only; no task caches or persists them (prepare-dataset caches a reference
to prepared Arrow files, nothing else).
The run's graph in the Prefect UI shows the pipeline: each step is given `opaque(...)` of the step results it uses
(Prefect draws an edge from the step that made each, and does not look inside: a dataset shares strings with other
results, and looking inside tied steps that share none), and `quote(...)` of the config it reads (every step reads
the config; an edge from validate-config to each would hide the pipeline, so the first step waits for it instead).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.utilities.annotations import opaque, quote

from pipeline_config.schema import PipelineConfig
from qlora.distributed import is_distributed
from qlora.model import pick_device
from qlora.registry import default_model_name
from qlora.trial import SweepTrial
from tasks.config import resolve_model_source_task, validate_config_task
from tasks.dataset import open_prepared_dataset_task, prepare_dataset_task
from tasks.evaluate import evaluate_models_task, evaluate_suites_task
from tasks.gpu_slots import gpu_slots
from tasks.model import load_quantized_model_task
from tasks.preflight import preflight_task
from tasks.registry import register_adapter_task
from tasks.report import publish_summary_task
from tasks.run_folder import claimed_run_folder
from tasks.save import save_adapter_task
from tasks.stages import resolve_starting_adapter_task
from tasks.stopping import stop_on_signals
from tasks.tokenizer import setup_tokenizer_task
from tasks.tracking import log_dataset_task, log_results_task, mlflow_run_of_flow_run
from tasks.train import train_adapter_task
from tasks.trial import prepare_trial_pruning_task


def prepare_inputs(cfg: PipelineConfig, device: str, config_step=None):
    """The steps every run of `cfg` starts with (this flow's and the sweep's): resolve-model-source ->
    setup-tokenizer -> prepare-dataset (cached) -> open-prepared-dataset -> preflight. Bad input stops the run
    there, before any weights load and before an MLflow run or anything else is written. Returns (model source,
    tokenizer, prepared dataset reference, opened dataset splits). They start once `config_step` (the step result
    the config came out of: `cfg` itself, or a sweep's space) is there."""
    source = resolve_model_source_task(quote(cfg.model), wait_for=[opaque(config_step or cfg)])
    # The tokenizer comes before the data: it is part of the prepared dataset's cache key.
    tokenizer = setup_tokenizer_task(opaque(source), quote(cfg.tokenizer), needs_chat_template=False)
    prepared = prepare_dataset_task(quote(cfg.data), opaque(tokenizer), quote(cfg.training))
    data = open_prepared_dataset_task(opaque(prepared), quote(cfg.data))
    preflight_task(quote(cfg), opaque(source), opaque(data), opaque(tokenizer), device)
    return source, tokenizer, prepared, data


@flow(name="qlora-finetune")
def finetune(
    config_path: str = "pipeline_config/default.yaml",
    overrides: list[str] | None = None,
    data_source: str | None = None,
    adapter: str | None = None,
    resume: Literal["auto", "never"] | None = None,
    resume_dir: str | None = None,
    config: PipelineConfig | None = None,
    trial: SweepTrial | None = None,
) -> dict:
    """Fine-tune the configured base model with QLoRA; returns a summary (metrics, adapter dir, MLflow run).

    Args:
        config_path: the YAML config, relative to the working folder (the repository for deployments).
        overrides: `section.key=value` overrides of the config, validated with it; repeatable.
        data_source: replaces `data.source` (what a `dataset.updated` event passes in).
        adapter: replaces `model.adapter`, the adapter a stage after SFT starts from (what a
            `qlora.champion.promoted` event passes in: the new champion's version).
        resume: replaces `training.resume`: 'never' (--no-resume) always starts a new run folder; 'auto' continues
            the newest unfinished run folder of the same run that no live process holds.
        resume_dir: continue this run folder (see `qlora-flow runs`; refused if it would mix two runs).
        config: an already validated config; `config_path` and `overrides` are then not read.
        trial: set by a sweep (flows/sweep.py) for its trials: continue the MLflow run the sweep created, report
            the eval loss to the sweep's Optuna study while training, stop early when its pruner says so.
    """
    cfg = validate_config_task(config, config_path, overrides, data_source, resume, resume_dir, adapter)
    device = pick_device(cfg.training.device)
    # SIGTERM / SIGINT / a cancellation from here on: training stops at the next step with a checkpoint (the folder
    # stays resumable), the MLflow run ends KILLED, locks and slots are released, and the flow run Cancelled/Crashed.
    with stop_on_signals(cfg.training.stop_grace_s):
        source, tokenizer, prepared, data = prepare_inputs(cfg, device)
        # A stage after SFT (training.method) may start from an earlier adapter: resolved once, before any weights.
        starting = resolve_starting_adapter_task(quote(cfg), wait_for=[opaque(data)]) if cfg.model.adapter else None
        callbacks = None
        if trial:
            callbacks = prepare_trial_pruning_task(opaque(trial), opaque(data), opaque(tokenizer), quote(cfg))
        with mlflow_run_of_flow_run(cfg, trial.mlflow_run_id if trial else None, starting) as run:
            log_dataset_task(opaque(data))
            # This flow run's own folder, locked until the flow ends and finished only if every step succeeds; then
            # its share of the GPU, until the flow ends.
            with (
                claimed_run_folder(cfg, source, data.digest, resume_dir) as run_folder,
                gpu_slots(cfg.training),
            ):
                # Several training processes (`distributed`) load their own copies; the flow's comes after training.
                model = None
                if not is_distributed(cfg, device):
                    model = load_quantized_model_task(opaque(source), quote(cfg), device)
                train = train_adapter_task.with_options(retries=cfg.training.task_retries)
                trained = train(
                    opaque(model),
                    opaque(data),
                    opaque(tokenizer),
                    quote(cfg),
                    device,
                    opaque(run_folder),
                    opaque(source),
                    opaque(prepared),
                    opaque(callbacks),
                    opaque(starting),
                )
                comparison = evaluate_models_task(
                    opaque(trained.model),
                    opaque(tokenizer),
                    opaque(data),
                    quote(cfg.evaluation),
                    cfg.training.max_seq_length,
                )
                suites = evaluate_suites_task(
                    opaque(trained.model), opaque(tokenizer), opaque(data), quote(cfg), opaque(run_folder)
                )
                adapter_dir = save_adapter_task(
                    opaque(trained.model), opaque(tokenizer), quote(cfg), opaque(run_folder)
                )
                metrics = log_results_task(
                    quote(cfg), opaque(trained), opaque(comparison), opaque(adapter_dir), opaque(suites)
                )
                decision = None
                if cfg.registry.enabled:
                    decision = register_adapter_task(
                        quote(cfg),
                        opaque(source),
                        opaque(adapter_dir),
                        opaque(metrics),
                        opaque(data.digest),
                        opaque(trained.adapter_dtype),
                        opaque(suites),
                        opaque(starting),
                    )
                publish_summary_task(
                    quote(cfg),
                    opaque(comparison),
                    opaque(adapter_dir),
                    opaque(data.digest),
                    opaque(run),
                    opaque(decision),
                    opaque(suites),
                )
    return {
        "base": comparison.base.metrics,
        "finetuned": comparison.finetuned.metrics,
        "train": trained.metrics,
        "adapter_dir": adapter_dir,
        "run_dir": str(run_folder.path),
        "run_dir_reason": run_folder.reason,
        "resumed_from": trained.resumed_from,
        "mlflow_run_id": run.info.run_id,
        "mlflow_experiment_id": run.info.experiment_id,
        "device": device,
        "dataset_digest": data.digest,
        "samples": comparison.samples,
        "registry": decision.__dict__ if decision else None,
        "registered_model": cfg.registry.model_name or default_model_name(cfg),
    }


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["run", *__import__("sys").argv[1:]]))
