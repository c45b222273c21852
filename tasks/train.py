"""Step 5: train the LoRA adapter with TRL's SFTTrainer.

The trainer gets the five things the original recipe passes: model, dataset, LoRA config, tokenizer and
training arguments. Recipe argument names are mapped onto the installed transformers (v5 folded
`warmup_ratio` into `warmup_steps` and replaced `group_by_length` with `train_sampling_strategy`).
Training loss per logging step reaches MLflow through transformers' own MLflowCallback (`report_to`).
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import SFTConfig, SFTTrainer

from pipeline_config.schema import PipelineConfig, TrainingConfig
from tasks.attention import packed_training_attention, resolve_attention
from tasks.data import DatasetSplits
from tasks.errors import PipelineInputError, retry_unless_input_error
from tasks.files import fsync_dir
from tasks.run_folder import STAGING_DIRNAME, write_fingerprint


@dataclass
class TrainResult:
    """The trained PEFT model (in memory) and what the run measured."""

    model: PreTrainedModel
    metrics: dict[str, float]
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    train_dataset: object = None  # the tokenized rows SFTTrainer trained on
    resumed_from: str | None = None  # checkpoint folder training continued from, if any
    adapter_dtype: str = "float32"  # dtype the trained LoRA weights are kept in (SFTTrainer: bf16 for QLoRA)


class AtomicCheckpointSFTTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints appear all at once: written into a staging folder, then renamed into place.

    transformers writes `checkpoint-N` file by file; a kill in the middle would leave a folder that
    `get_last_checkpoint` picks up and resume then fails on. Here a `checkpoint-N` folder exists only complete.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Resume with the adapter weights in the dtype training uses: peft up-casts loaded adapters to fp32,
        while SFTTrainer keeps QLoRA adapters in bf16, so an un-fixed resume would train on different numerics."""
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in target.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIRNAME)
        shutil.rmtree(staging, ignore_errors=True)
        get_output_dir = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging  # super() writes checkpoint-N under staging
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise PipelineInputError(
                    f"disk full while writing a checkpoint in {run_dir}: free space and re-run; training resumes "
                    "from the newest complete checkpoint"
                ) from None
            raise
        finally:
            self._get_output_dir = get_output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        target = os.path.join(run_dir, name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(os.path.join(staging, name), target)
        fsync_dir(run_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)


class RunLoggerProgress(TrainerCallback):
    """Training progress (step, loss, learning rate, ETA) into the Prefect run log, so the UI shows it."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_step = 0

    def _logger(self):
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            import logging

            return logging.getLogger(__name__)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        done = state.global_step - self.first_step
        elapsed = time.perf_counter() - self.started
        eta_s = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        self._logger().info(
            "step %d/%d loss %.4f lr %.3g elapsed %.0fs ETA %.0fs",
            state.global_step,
            state.max_steps,
            logs["loss"],
            logs.get("learning_rate", float("nan")),
            elapsed,
            eta_s,
        )


class CheckpointFirstLayers(TrainerCallback):
    """Keep activation checkpointing only on the first N decoder layers (`training.gradient_checkpointing_layers`):
    each layer left out trades its recompute (~1/3 of its step time) for its activations' memory.

    N unset = all but the last layer: the last layer's recompute would run right after the forward, when the
    peak (every checkpoint + one layer's full activations) is the same either way, so it buys no memory."""

    def __init__(self, layers: int | None) -> None:
        self.layers = layers

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        layers = self.layers if self.layers is not None else len(blocks) - 1
        for index, block in enumerate(blocks):
            block.gradient_checkpointing = index < layers


def use_liger_kernels(requested: bool | str, device: str) -> bool:
    """Resolve `training.liger_kernels`: 'auto' = on CUDA when liger-kernel is installed."""
    import importlib.util

    installed = importlib.util.find_spec("liger_kernel") is not None
    if requested == "auto":
        return device == "cuda" and installed
    if requested and not installed:
        raise PipelineInputError("training.liger_kernels is true but liger-kernel is not installed: pip install it")
    return bool(requested)


def latest_complete_checkpoint(run_dir: str) -> str | None:
    """Newest `checkpoint-N` folder of a run folder (only complete ones exist, see AtomicCheckpointSFTTrainer)."""
    return get_last_checkpoint(run_dir) if Path(run_dir).is_dir() else None


def build_sft_config(cfg: TrainingConfig, device: str, report_to_mlflow: bool, output_dir: str) -> SFTConfig:
    """SFTConfig from the recipe-named TrainingConfig; checkpoints go to `output_dir` (the run folder)."""
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing needs no input that requires grad and works with frozen 4-bit layers.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=use_liger_kernels(cfg.liger_kernels, device),
        max_grad_norm=cfg.max_grad_norm,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the total steps
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        seed=cfg.seed,
        use_cpu=device == "cpu",
        dataloader_pin_memory=device != "cpu",
        include_num_input_tokens_seen="non_padding",
        eval_strategy="no",
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        packing_strategy=cfg.packing_strategy,
        completion_only_loss=cfg.completion_only_loss,
        report_to=["mlflow"] if report_to_mlflow else "none",
        disable_tqdm=not sys.stderr.isatty(),
    )


def _layer_callbacks(cfg: TrainingConfig) -> list[TrainerCallback]:
    if cfg.gradient_checkpointing:
        return [CheckpointFirstLayers(cfg.gradient_checkpointing_layers)]
    return []


def peak_memory_bytes(device: str) -> int:
    """Peak accelerator memory on CUDA, else the process's peak resident set size."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def train_adapter(
    model: PreTrainedModel,
    data: DatasetSplits,
    lora_config: LoraConfig,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainingConfig,
    device: str,
    report_to_mlflow: bool = False,
    extra_callbacks: list[TrainerCallback] | None = None,
    run_dir: str | None = None,
    fingerprint: dict | None = None,
) -> TrainResult:
    """Run SFTTrainer and return the PEFT model with its training metrics.

    With `run_dir` (the flow's run folder, which this process holds): checkpoints go there, training continues from
    its newest complete checkpoint if it has one (a resumed run, or a retry of this task), and a fresh start writes
    `fingerprint` there first. Without it (bench, tests): `training.output_dir`, always from step 0.
    """
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resume_from = latest_complete_checkpoint(run_dir) if run_dir else None
    if run_dir and resume_from is None and fingerprint is not None:
        write_fingerprint(run_dir, fingerprint)
    trainer = AtomicCheckpointSFTTrainer(
        model=model,
        args=build_sft_config(cfg, device, report_to_mlflow, run_dir or cfg.output_dir),
        train_dataset=data.train,
        peft_config=lora_config,
        processing_class=tokenizer,
        callbacks=[RunLoggerProgress(), *_layer_callbacks(cfg), *(extra_callbacks or [])],
    )
    if cfg.fused_lora:
        from tasks.fused_lora import fuse_lora_layers

        fuse_lora_layers(trainer.model)
    started = time.perf_counter()
    padding_free = bool(getattr(trainer, "padding_free", False))
    with packed_training_attention(trainer.model, resolve_attention(cfg.attention, device), padding_free):
        output = trainer.train(resume_from_checkpoint=resume_from)
    wall_s = time.perf_counter() - started
    tokens = float(trainer.state.num_input_tokens_seen)  # restored from the checkpoint when resuming
    metrics = {
        "train_loss": float(output.training_loss),
        "train_runtime_s": wall_s,
        "train_steps": float(trainer.state.global_step),
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "train_peak_memory_mib": peak_memory_bytes(device) / 2**20,
    }
    losses = [(h["step"], float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    trainer.model.eval()
    return TrainResult(
        model=trainer.model,
        metrics=metrics,
        loss_history=losses,
        train_dataset=trainer.train_dataset,
        resumed_from=resume_from,
        adapter_dtype=next(
            str(p.dtype).removeprefix("torch.") for n, p in trainer.model.named_parameters() if "lora_" in n
        ),
    )


@task(
    name="train-adapter",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_input_error,
)
def train_adapter_task(
    model, data, lora_config, tokenizer, cfg: PipelineConfig, device: str, report_to_mlflow: bool, run_folder
):
    """Prefect wrapper. On a retry the in-memory model may be half-updated, so it is rebuilt from the config and
    training continues from the newest complete checkpoint of this flow run's own folder, never from step 0."""
    from prefect.runtime import task_run

    from tasks.model import load_quantized_model, wrap_lora

    if (task_run.run_count or 1) > 1:
        model, lora_config = wrap_lora(
            load_quantized_model(cfg.model, cfg.quantization, device, cfg.training.attention), cfg.lora, cfg.training
        )
    return train_adapter(
        model,
        data,
        lora_config,
        tokenizer,
        cfg.training,
        device,
        report_to_mlflow,
        run_dir=str(run_folder.path),
        fingerprint=run_folder.fingerprint,
    )
