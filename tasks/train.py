"""Step 5: train the LoRA adapter with TRL's SFTTrainer.

The trainer gets the five things the original recipe passes: model, dataset, LoRA config, tokenizer and
training arguments. Recipe argument names are mapped onto the installed transformers (v5 folded
`warmup_ratio` into `warmup_steps` and replaced `group_by_length` with `train_sampling_strategy`).
Training loss per logging step reaches MLflow through transformers' own MLflowCallback (`report_to`).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from pipeline_config.schema import TrainingConfig
from tasks.data import DatasetSplits


@dataclass
class TrainResult:
    """The trained PEFT model (in memory) and what the run measured."""

    model: PreTrainedModel
    metrics: dict[str, float]
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    train_dataset: object = None  # the tokenized rows SFTTrainer trained on


def build_sft_config(cfg: TrainingConfig, device: str, report_to_mlflow: bool) -> SFTConfig:
    """SFTConfig from the recipe-named TrainingConfig."""
    return SFTConfig(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
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
        save_strategy="no",
        report_to=["mlflow"] if report_to_mlflow else "none",
        disable_tqdm=not sys.stderr.isatty(),
    )


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
) -> TrainResult:
    """Run SFTTrainer and return the PEFT model with its training metrics."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(cfg, device, report_to_mlflow),
        train_dataset=data.train,
        peft_config=lora_config,
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    output = trainer.train()
    wall_s = time.perf_counter() - started
    tokens = float(trainer.state.num_input_tokens_seen)
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
    return TrainResult(model=trainer.model, metrics=metrics, loss_history=losses, train_dataset=trainer.train_dataset)


@task(name="train-adapter", cache_policy=NO_CACHE, persist_result=False)
def train_adapter_task(model, data, lora_config, tokenizer, cfg: TrainingConfig, device: str, report_to_mlflow: bool):
    """Prefect wrapper; no retries: a retry would start training over (resume comes with checkpointing)."""
    return train_adapter(model, data, lora_config, tokenizer, cfg, device, report_to_mlflow)
